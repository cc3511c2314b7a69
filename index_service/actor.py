"""The Ray actor that hosts one `Shard`, made durable by its log and snapshots.

Every write is appended to the shard's log (fsync'd) before it is applied and acknowledged.
Every `snapshot_every` records the actor writes an atomic, checksummed snapshot, starts a new
log segment and drops segments older than the oldest snapshot it keeps. The constructor
recovers: newest snapshot that verifies (older ones, then an empty shard, as fallbacks) plus
log replay from its sequence; a gap in the log refuses to start rather than serve a shard
with acknowledged writes missing. So a restarted actor (Ray restarts it after a crash) or a
restarted server comes back with every acknowledged write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from clipsearch.errors import ClipsearchError, DeadlineExceeded, Unavailable
from clipsearch.settings import IndexSettings
from clipsearch.types import (
    DocRecord,
    DocWrite,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
    ShardStats,
)
from index_service import channel, wire
from index_service.shard import Shard
from index_service.snapshot import SnapshotStore
from index_service.wal import DeleteOp, LogError, ShardLog, UpsertOp

log = logging.getLogger(__name__)

MANIFEST = "shard.json"
SNAPSHOTS = "snapshots"
LOCK = "LOCK"
LOCK_WAIT_S = 60.0


class ShardActor:
    """Ray runs this actor's method calls one at a time (a sync actor); searches that come
    over the direct channel (index_service.channel) run on its own thread beside them, and
    the Shard's readers-writer lock keeps them apart from writes."""

    def __init__(
        self, shard_id: int, dim: int, index: IndexSettings, data_dir: str, model_id: str
    ) -> None:
        self._settings = index
        self._identity = {"dim": dim, "model_id": model_id}
        self._dir = Path(data_dir) / f"shard-{shard_id}"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self._dir / LOCK, LOCK_WAIT_S)
        _check_manifest(self._dir / MANIFEST, self._identity)
        self._snapshots = SnapshotStore(self._dir / SNAPSHOTS)
        self._shard, self._snapshot_seq = self._load_snapshot(shard_id, dim)
        # Snapshots are written by one background thread while searches (and writes) go on;
        # `_log_lock` keeps log appends and the segment cut that follows a snapshot apart.
        self._log_lock = threading.Lock()
        self._snapshotter = ThreadPoolExecutor(1, thread_name_prefix=f"snapshot-{shard_id}")
        self._pending: Future[None] | None = None
        self.searches_skipped = 0  # searches whose caller's deadline passed before they ran
        self._skipped_lock = threading.Lock()  # Ray's thread and the channel's both count
        self._channel: channel.ChannelServer | None = None
        self._log = ShardLog(self._dir, self._snapshot_seq)
        replayed = 0
        for op in self._log.replay(self._snapshot_seq):
            self._apply(op)
            replayed += 1
        log.info(
            "shard %d recovered: snapshot at %d + %d log records",
            shard_id,
            self._snapshot_seq,
            replayed,
        )
        if index.search_channel and channel.supported():
            self._channel = channel.ChannelServer(self.search_many, f"shard{shard_id}")

    def _load_snapshot(self, shard_id: int, dim: int) -> tuple[Shard, int]:
        """The newest snapshot that verifies and loads, else an empty shard at sequence 0."""
        for snap in self._snapshots.verified():
            try:
                shard = Shard.load(snap.path, shard_id, dim, self._settings, mmap=True)
            except Exception:  # a verified file Faiss still refuses: try an older one
                log.exception("shard %d: snapshot %s does not load", shard_id, snap.path.name)
                continue
            return shard, snap.seq
        return Shard(shard_id, dim, self._settings), 0

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
        self,
        modality: Modality,
        query: np.ndarray,
        k: int,
        flt: SearchFilter | None,
        params: SearchParams | None = None,
        deadline: float | None = None,
    ) -> ShardHits:
        """The shard's top k; `deadline` (epoch seconds, the caller's) refuses work that
        starts too late: `ray.cancel` cannot stop a call a sync actor already dequeued."""
        self._check_deadline(deadline)
        return self._shard.search(modality, query, k, flt, params)

    def search_packed(self, request: wire.SearchRequest) -> wire.SearchReply:
        """`search` with its arguments and answer as plain tuples (see index_service.wire):
        the form the gateway calls, cheaper to serialise."""
        return wire.pack_hits(self.search(*wire.unpack_request(request)))

    def search_many(
        self, requests: Sequence[wire.SearchRequest]
    ) -> list[wire.SearchReply | ClipsearchError]:
        """Several packed searches in one call (the gateway coalesces concurrent ones); an
        item refused on its own (its deadline passed) is answered with its error.

        Searches alike in all but their query vector (modality, k, filter, parameters: a
        feed's callers mostly are) run as one batched index search (`Shard.search_many`).
        """
        if len(requests) == 1:  # the common case at low load: nothing to group
            try:
                return [self.search_packed(requests[0])]
            except ClipsearchError as exc:
                return [exc]
        answers: list[wire.SearchReply | ClipsearchError | None] = [None] * len(requests)
        alike: dict[tuple[Any, ...], list[int]] = {}
        for n, request in enumerate(requests):
            try:
                self._check_deadline(request[5])
            except DeadlineExceeded as exc:
                answers[n] = exc
                continue
            modality, vector, k, packed_flt, packed_params, _ = request
            alike.setdefault((modality, len(vector), k, packed_flt, packed_params), []).append(n)
        for members in alike.values():
            modality, _, k, flt, params, _ = wire.unpack_request(requests[members[0]])
            queries = np.stack([np.frombuffer(requests[n][1], dtype=np.float32) for n in members])
            try:
                hits = self._shard.search_many(modality, queries, k, flt, params)
            except ClipsearchError as exc:
                for n in members:
                    answers[n] = exc
                continue
            for n, found in zip(members, hits, strict=True):
                answers[n] = wire.pack_hits(found)
        return answers  # type: ignore[return-value]  # every slot is filled above

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and time.time() >= deadline:
            with self._skipped_lock:
                self.searches_skipped += 1
            raise DeadlineExceeded("deadline exceeded before the shard search started")

    def search_channel(self) -> tuple[str, str] | None:
        """(Ray node id, socket address) of the direct search channel (see
        index_service.channel), or None when it is off."""
        if self._channel is None:
            return None
        return ray.get_runtime_context().get_node_id(), self._channel.address

    def skipped(self) -> int:
        """How many searches were refused because their deadline had passed (tests)."""
        return self.searches_skipped

    def stats(self) -> ShardStats:
        return replace(
            self._shard.stats(),
            snapshot_seq=self._snapshot_seq,
            log_records_since_snapshot=self._log.last_seq - self._snapshot_seq,
        )

    def snapshot(self) -> int:
        """Write a snapshot now and wait for it (also done in the background every
        `snapshot_every` records); returns the sequence it covers."""
        self.wait_for_snapshot()
        self._take_snapshot(self._log.last_seq)
        return self._snapshot_seq

    def wait_for_snapshot(self) -> None:
        """Block until no background snapshot is being written."""
        if self._pending is not None:
            self._pending.result()

    def pid(self) -> int:
        """The worker process id (tests kill it to prove recovery)."""
        return os.getpid()

    def clear(self) -> None:
        """Drop every document, durably (snapshots go, the log starts over)."""
        self.wait_for_snapshot()
        shutil.rmtree(self._dir / SNAPSHOTS)
        self._snapshots = SnapshotStore(self._dir / SNAPSHOTS)
        self._log.destroy()
        self._snapshot_seq = 0
        self._shard.clear()

    def close(self) -> None:
        """Release the log and the directory lock (tests; a dying process releases both)."""
        if self._channel is not None:
            self._channel.close()
        self.wait_for_snapshot()
        self._snapshotter.shutdown()
        self._log.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _log_and_apply(self, op: UpsertOp | DeleteOp) -> None:
        try:
            with self._log_lock:
                self._log.append([op])
        except LogError as exc:
            # Never retried (a failed fsync may have lost pages); the write is in doubt.
            raise Unavailable(
                f"shard {self._shard.shard_id} cannot write its log; the write is in doubt"
            ) from exc
        self._apply(op)
        due = self._log.last_seq - self._snapshot_seq >= self._settings.snapshot_every
        if due and (self._pending is None or self._pending.done()):
            self._pending = self._snapshotter.submit(self._take_snapshot, self._log.last_seq)

    def _take_snapshot(self, seq: int) -> None:
        """Snapshot the shard (state at `seq` or later), then cut and trim the log.

        Runs beside further writes, so the saved state may already include some records
        after `seq`; recovery replays from `seq + 1` anyway, which is exact because every
        record sets whole documents (an upsert replaces, a delete removes): re-applying a
        record the snapshot already holds changes nothing. A failure here loses nothing
        (the log still holds every record) and is only logged; a later write tries again.
        """
        if seq <= self._snapshot_seq:
            return
        info = {**self._identity, "factory": self._settings.factory, "documents": len(self._shard)}
        try:
            self._snapshots.write(seq, self._shard.save, info)
            with self._log_lock:
                self._snapshot_seq = seq
                self._log.rotate()
                trim_point = self._snapshots.trim_point()
                if trim_point is not None:
                    self._log.trim(trim_point)
        except (OSError, ValueError, RuntimeError):
            log.exception("shard %d: snapshot at %d failed", self._shard.shard_id, seq)

    def _apply(self, op: UpsertOp | DeleteOp) -> None:
        if isinstance(op, UpsertOp):
            self._shard.upsert(op.writes)
        else:
            self._shard.delete(op.ids)


def _lock_directory(path: Path, wait_s: float) -> int:
    """Hold an exclusive lock on the shard's directory for this process's lifetime.

    A server restarted right after a kill -9 can meet the old incarnation's actor still
    alive for a few seconds; two writers on one log would corrupt it, so wait for it to go.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(
                    f"{path.parent.name} is locked by another running server; stop it first"
                ) from None
            time.sleep(0.1)


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
        remote_cls.options(name=f"{name_prefix}-{i}", resources=dict(index.actor_resources)).remote(
            i, dim, index, data_dir, model_id
        )
        for i in range(index.shards)
    ]
    ray.get([a.ready.remote() for a in actors])
    return actors
