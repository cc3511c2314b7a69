"""The encoder service: image decoding, the CLIP-style model wrapper and its Ray Serve deployment.

`images` and `model` are plain libraries (no Ray); `deployment` wraps them in a batched
Ray Serve deployment.
"""
