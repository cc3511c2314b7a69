"""Training code for the clipsearch demo CLIP model (tokenizer, contrastive loop, CLI)."""
