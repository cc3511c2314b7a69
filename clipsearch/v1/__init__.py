"""Generated gRPC stubs of the clipsearch.v1 API (do not edit; `make proto`)."""
