"""The grpc.aio gateway: validation, fan-out, merge, recency re-rank, status mapping."""
