"""The Ray actor that hosts one `Shard`, made durable by its write-ahead log.

Every write is appended to the shard's log (fsync'd) before it is applied and acknowledged;
the constructor replays the log, so a restarted actor (Ray restarts it after a crash) or a
restarted server comes back with every acknowledged write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from clipsearch.errors import Unavailable
from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, ShardHits, ShardStats
from index_service.shard import Shard
from index_service.wal import DeleteOp, LogError, UpsertOp, WriteAheadLog, replay

MANIFEST = "shard.json"
LOG = "wal.log"


class ShardActor:
    """One call at a time (Ray's default for a sync actor), so writes never race searches."""

    def __init__(
        self, shard_id: int, dim: int, index: IndexSettings, data_dir: str, model_id: str
    ) -> None:
        self._settings = index
        self._shard = Shard(shard_id, dim, index.factory)
        self._dir = Path(data_dir) / f"shard-{shard_id}"
        self._dir.mkdir(parents=True, exist_ok=True)
        _check_manifest(self._dir / MANIFEST, {"dim": dim, "model_id": model_id})
        self._log = WriteAheadLog(self._dir / LOG)
        for op in replay(self._dir / LOG):
            self._apply(op)

    def ready(self) -> int:
        """Returns the shard id once constructed and recovered (used to wait for start-up)."""
        return self._shard.shard_id

    def upsert(self, writes: Sequence[DocWrite]) -> int:
        self._log_and_apply(UpsertOp(tuple(writes)))
        return len(writes)

    def delete(self, doc_ids: Sequence[str]) -> int:
        present = tuple(i for i in dict.fromkeys(doc_ids) if self._shard.get([i])[0] is not None)
        if present:
            self._log_and_apply(DeleteOp(present))
        return len(present)

    def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        return self._shard.get(doc_ids)

    def search(
        self, modality: Modality, query: np.ndarray, k: int, flt: SearchFilter | None
    ) -> ShardHits:
        return self._shard.search(modality, query, k, flt)

    def stats(self) -> ShardStats:
        return self._shard.stats()

    def pid(self) -> int:
        """The worker process id (tests kill it to prove recovery)."""
        return os.getpid()

    def clear(self) -> None:
        """Drop every document, durably (the log starts over)."""
        self._log.close()
        (self._dir / LOG).unlink(missing_ok=True)
        self._log = WriteAheadLog(self._dir / LOG)
        self._shard.clear()

    def _log_and_apply(self, op: UpsertOp | DeleteOp) -> None:
        try:
            self._log.append([op])
        except LogError as exc:
            # Never retried (a failed fsync may have lost pages); the write is in doubt.
            raise Unavailable(
                f"shard {self._shard.shard_id} cannot write its log; the write is in doubt"
            ) from exc
        self._apply(op)

    def _apply(self, op: UpsertOp | DeleteOp) -> None:
        if isinstance(op, UpsertOp):
            self._shard.upsert(op.writes)
        else:
            self._shard.delete(op.ids)


def _check_manifest(path: Path, expected: dict[str, object]) -> None:
    """Refuse data written with another model: its vectors live in a different space."""
    if path.exists():
        found = json.loads(path.read_text())
        if found != expected:
            raise RuntimeError(
                f"{path.parent.name} holds vectors of {found}, but the server runs {expected}; "
                "use another data_dir or re-ingest"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(expected))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_shards(
    index: IndexSettings, dim: int, data_dir: str, model_id: str, name_prefix: str
) -> list:
    """Start `index.shards` actors (restarted by Ray after a crash) and wait until recovered."""
    remote_cls: Any = ray.remote(num_cpus=0, max_restarts=-1)(ShardActor)
    actors = [
        remote_cls.options(name=f"{name_prefix}-{i}").remote(i, dim, index, data_dir, model_id)
        for i in range(index.shards)
    ]
    ray.get([a.ready.remote() for a in actors])
    return actors
