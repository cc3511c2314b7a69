"""Stable routing of document ids to shards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def shard_of(doc_id: str, n_shards: int) -> int:
    """The shard that owns `doc_id`: stable across processes, machines and Python versions.

    Python's `hash()` is salted per process, so a keyed digest is used instead.
    """
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n_shards


def group_by_shard(doc_ids: Iterable[str], n_shards: int) -> dict[int, list[str]]:
    """Ids grouped by owning shard, keeping their order within each group."""
    groups: dict[int, list[str]] = {}
    for doc_id in doc_ids:
        groups.setdefault(shard_of(doc_id, n_shards), []).append(doc_id)
    return groups
