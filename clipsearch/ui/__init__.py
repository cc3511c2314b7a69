"""`clipsearch ui`: a small web page for people, talking to the gateway over gRPC."""
