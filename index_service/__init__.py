"""Faiss shards: the pure engine (`shard`), the Ray actor around it (`actor`), the router."""
