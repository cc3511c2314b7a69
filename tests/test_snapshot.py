"""Snapshots and recovery of one shard: atomic, verified before Faiss sees them, log-backed.

The actor class is used directly (no Ray): recovery is its constructor.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, DocWrite, Modality
from index_service import actor as actor_module
from index_service.actor import ShardActor
from index_service.shard import Shard
from index_service.snapshot import MANIFEST, SnapshotStore, snapshot_name
from index_service.wal import LogCorruption, ShardLog, UpsertOp, WriteAheadLog, segment_name
from tests.fakes import unit_vectors

DIM = 8
MODEL = "test-model"


def _write(i: int, vectors: np.ndarray) -> DocWrite:
    record = DocRecord(f"doc-{i}", float(i), {"parity": str(i % 2)}, f"caption {i}", True, False)
    return DocWrite(record, image_vector=vectors[i % len(vectors)])


def _open(data_dir: Path, snapshot_every: int = 5) -> ShardActor:
    return ShardActor(0, DIM, IndexSettings(snapshot_every=snapshot_every), str(data_dir), MODEL)


def _fill(actor: ShardActor, n: int) -> np.ndarray:
    """n upserts, each followed by waiting for its snapshot, so snapshot points are exact."""
    vectors = unit_vectors(n, DIM, seed=1)
    for i in range(n):
        actor.upsert([_write(i, vectors)])
        actor.wait_for_snapshot()
    return vectors


def _ids(actor: ShardActor, query: np.ndarray, k: int = 100) -> list[str]:
    return [r.id for r in actor.search(Modality.IMAGE, query, k, None).records]


def _shard_dir(data_dir: Path) -> Path:
    return data_dir / "shard-0"


# ---------------------------------------------------------------- the store


def test_a_snapshot_is_written_whole_and_older_ones_are_pruned(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)

    def save(d: Path) -> None:
        (d / "a.bin").write_bytes(b"abc")

    for seq in (3, 7, 12):
        store.write(seq, save, {"n": seq})
    assert store.sequences() == [12, 7]
    newest = next(store.verified())
    assert (newest.seq, newest.info) == (12, {"n": 12})
    assert sorted(p.name for p in newest.path.iterdir()) == [MANIFEST, "a.bin"]


def test_a_crashed_half_written_snapshot_is_ignored_and_cleaned(tmp_path: Path) -> None:
    half = tmp_path / f".tmp-{snapshot_name(9)}-123"
    half.mkdir()
    (half / "a.bin").write_bytes(b"partial")
    store = SnapshotStore(tmp_path)
    assert not half.exists()
    assert list(store.verified()) == []


@pytest.mark.parametrize(
    "damage",
    ["flip_a_byte", "truncate", "extra_file", "no_manifest", "manifest_garbage"],
)
def test_damaged_snapshots_are_rejected_with_the_reason(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = SnapshotStore(tmp_path)
    snap = store.write(5, lambda d: (d / "index.faiss").write_bytes(bytes(range(256)) * 4), {})
    target = snap.path / "index.faiss"
    if damage == "flip_a_byte":
        data = bytearray(target.read_bytes())
        data[100] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "extra_file":
        (snap.path / "stray").write_bytes(b"x")
    elif damage == "no_manifest":
        (snap.path / MANIFEST).unlink()
    else:
        (snap.path / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.ERROR):
        assert list(store.verified()) == []
    expected = {
        "flip_a_byte": "fails its sha256 checksum",
        "truncate": "has 1014 bytes, the manifest says 1024",
        "extra_file": "do not match the manifest",
        "no_manifest": "has no MANIFEST.json",
        "manifest_garbage": "unreadable MANIFEST.json",
    }[damage]
    assert expected in caplog.text and snap.path.name in caplog.text


# ---------------------------------------------------------------- the segmented log


def test_segments_rotate_trim_and_replay_without_gaps(tmp_path: Path) -> None:
    vectors = unit_vectors(10, DIM, seed=2)
    chain = ShardLog(tmp_path)
    for i in range(4):
        chain.append([UpsertOp((_write(i, vectors),))])
    chain.rotate()
    for i in range(4, 6):
        chain.append([UpsertOp((_write(i, vectors),))])
    assert [first for first, _ in chain.segments()] == [1, 5]
    assert [op.seq for op in chain.replay(2)] == [3, 4, 5, 6]
    assert chain.trim(keep_after=4) == 1  # records 1..4 all covered by a snapshot at 4
    assert [op.seq for op in chain.replay(4)] == [5, 6]
    with pytest.raises(LogCorruption, match=r"records 1\.\.4 are missing"):
        list(chain.replay(0))


def test_a_one_file_log_of_an_earlier_version_is_adopted(tmp_path: Path) -> None:
    vectors = unit_vectors(3, DIM, seed=3)
    with WriteAheadLog(tmp_path / "wal.log") as wal:
        wal.append([UpsertOp((_write(0, vectors),)), UpsertOp((_write(1, vectors),))])
    chain = ShardLog(tmp_path)
    assert [p.name for _, p in chain.segments()] == [segment_name(1)]
    assert chain.last_seq == 2
    assert [op.seq for op in chain.replay()] == [1, 2]


# ---------------------------------------------------------------- recovery of the actor


def test_restart_is_snapshot_plus_log_tail_and_the_log_is_trimmed(tmp_path: Path) -> None:
    actor = _open(tmp_path, snapshot_every=5)
    vectors = _fill(actor, 23)
    actor.delete(["doc-3", "doc-21"])
    actor.wait_for_snapshot()
    stats = actor.stats()
    assert stats.snapshot_seq == 20  # snapshots at 5, 10, 15, 20; 24 = 23 upserts + 1 delete
    assert stats.log_records_since_snapshot == 4
    shard_dir = _shard_dir(tmp_path)
    assert SnapshotStore(shard_dir / "snapshots").sequences() == [20, 15]
    # Segments before the oldest kept snapshot (15) are gone; the chain still reaches it.
    assert sorted(p.name for p in shard_dir.glob("wal-*.log")) == [
        segment_name(16),
        segment_name(21),
    ]
    before = _ids(actor, vectors[0])
    actor.close()

    again = _open(tmp_path, snapshot_every=5)
    assert _ids(again, vectors[0]) == before
    assert len(before) == 21 and "doc-3" not in before and "doc-21" not in before
    assert again.get(["doc-22"])[0] == DocRecord(
        "doc-22", 22.0, {"parity": "0"}, "caption 22", True, False
    )
    again.upsert([_write(30, unit_vectors(40, DIM, seed=1))])  # numbering continues: 25
    again.wait_for_snapshot()
    assert again.stats().snapshot_seq == 25 and again.stats().log_records_since_snapshot == 0
    again.close()


def test_a_corrupt_newest_snapshot_falls_back_to_the_older_one_before_faiss_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    actor = _open(tmp_path, snapshot_every=5)
    vectors = _fill(actor, 12)
    expected = _ids(actor, vectors[1])
    actor.close()
    newest = _shard_dir(tmp_path) / "snapshots" / snapshot_name(10)
    index_file = newest / "image.faiss"
    index_file.write_bytes(index_file.read_bytes()[: index_file.stat().st_size // 2])

    loaded: list[str] = []
    real_load = Shard.load

    def spy(directory: Path, *args: object, **kwargs: object) -> Shard:
        loaded.append(Path(directory).name)
        return real_load(directory, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(actor_module.Shard, "load", spy)
    with caplog.at_level(logging.ERROR):
        again = _open(tmp_path, snapshot_every=5)
    assert loaded == [snapshot_name(5)]  # the damaged one never reached Faiss
    assert snapshot_name(10) in caplog.text and "image.faiss" in caplog.text
    assert _ids(again, vectors[1]) == expected
    again.close()


def test_with_every_snapshot_damaged_the_shard_rebuilds_from_a_complete_log(
    tmp_path: Path,
) -> None:
    actor = _open(tmp_path, snapshot_every=5)
    vectors = _fill(actor, 8)  # one snapshot (5): the log still reaches back to record 1
    expected = _ids(actor, vectors[2])
    actor.close()
    (_shard_dir(tmp_path) / "snapshots" / snapshot_name(5) / "records.json").write_text("[]")
    again = _open(tmp_path, snapshot_every=5)
    assert _ids(again, vectors[2]) == expected
    again.close()


def test_with_every_snapshot_damaged_and_the_log_trimmed_the_shard_refuses_to_start(
    tmp_path: Path,
) -> None:
    actor = _open(tmp_path, snapshot_every=5)
    _fill(actor, 17)
    actor.close()
    for seq in (15, 10):
        (_shard_dir(tmp_path) / "snapshots" / snapshot_name(seq) / "records.json").write_text("")
    with pytest.raises(LogCorruption, match=r"records 1\.\.10 are missing"):
        _open(tmp_path, snapshot_every=5)


def test_a_second_server_on_the_same_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actor_module, "LOCK_WAIT_S", 0.3)
    first = _open(tmp_path)
    with pytest.raises(RuntimeError, match="locked by another running server"):
        _open(tmp_path)
    first.close()
    _open(tmp_path).close()


def test_clear_removes_snapshots_and_log(tmp_path: Path) -> None:
    actor = _open(tmp_path, snapshot_every=3)
    _fill(actor, 7)
    actor.clear()
    assert actor.stats().documents == 0 and actor.stats().snapshot_seq == 0
    actor.close()
    again = _open(tmp_path, snapshot_every=3)
    assert again.stats().documents == 0
    again.close()


def test_durability_order_files_then_manifest_then_rename_then_log_trim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 cannot test fsync (the page cache survives the process), so test the order."""
    from index_service import snapshot as snapshot_module
    from index_service import wal as wal_module

    events: list[str] = []
    real_fsync_file, real_fsync_dir = snapshot_module._fsync_file, snapshot_module.fsync_dir
    real_rename, real_trim = snapshot_module.os.rename, ShardLog.trim

    def fsync_file(path: Path) -> None:
        events.append(f"fsync {path.name}")
        real_fsync_file(path)

    def fsync_dir(path: Path) -> None:
        events.append(f"fsync-dir {path.name}")
        real_fsync_dir(path)

    def rename(src: object, dst: object) -> None:
        events.append(f"rename {Path(str(dst)).name}")
        real_rename(src, dst)  # type: ignore[arg-type]

    def trim(self: ShardLog, keep_after: int) -> int:
        removed = real_trim(self, keep_after)
        events.append(f"trim {keep_after} removed {removed}")
        return removed

    monkeypatch.setattr(snapshot_module, "_fsync_file", fsync_file)
    monkeypatch.setattr(snapshot_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(snapshot_module.os, "rename", rename)
    monkeypatch.setattr(wal_module.ShardLog, "trim", trim)
    actor = _open(tmp_path, snapshot_every=3)
    _fill(actor, 6)  # snapshots at 3 (nothing to trim yet: one snapshot) and at 6
    actor.close()
    name = snapshot_name(6)
    start = events.index(f"rename {snapshot_name(3)}") + 3  # after its two directory fsyncs
    manifest = events.index("fsync MANIFEST.json", start)
    data_files = events[start:manifest]
    assert len(data_files) >= 2 and all(e.startswith("fsync ") for e in data_files)
    assert events[manifest:] == [
        "fsync MANIFEST.json",
        f"fsync-dir .tmp-{name}-{os.getpid()}",
        f"rename {name}",
        "fsync-dir snapshots",  # the rename is durable ...
        "fsync-dir snapshots",  # ... and so is the pruning (nothing to prune at two)
        "trim 3 removed 1",  # ... before the records it covers leave the log
    ]


def test_background_snapshots_beside_writes_and_searches_recover_exactly(tmp_path: Path) -> None:
    """Snapshots run in a thread while writes continue, so a snapshot may hold records past
    its sequence; replaying them again must give exactly the same shard."""
    import threading

    actor = _open(tmp_path, snapshot_every=7)
    vectors = unit_vectors(300, DIM, seed=4)
    stop = threading.Event()
    searched = []

    def search_loop() -> None:
        while not stop.is_set():
            searched.append(len(_ids(actor, vectors[0], k=5)))

    reader = threading.Thread(target=search_loop)
    reader.start()
    rng = np.random.default_rng(0)
    for step in range(300):  # upserts, replacements of earlier ids and deletes, interleaved
        i = int(rng.integers(0, step + 1))
        if step % 5 == 4:
            actor.delete([f"doc-{i}"])
        else:
            actor.upsert([_write(i if step % 3 == 2 else step, vectors)])
    stop.set()
    reader.join()
    actor.wait_for_snapshot()
    assert searched and actor.stats().snapshot_seq > 0
    expected = {doc_id: actor.get([doc_id])[0] for doc_id in (f"doc-{i}" for i in range(300))}
    order = _ids(actor, vectors[9], k=300)
    actor.close()
    again = _open(tmp_path, snapshot_every=7)
    assert {d: again.get([d])[0] for d in expected} == expected
    assert _ids(again, vectors[9], k=300) == order
    again.close()


def test_a_trained_ann_shard_comes_back_from_its_snapshot_memory_mapped(tmp_path: Path) -> None:
    settings = IndexSettings(factory="IVF8,Flat", train_min_vectors=200, snapshot_every=10_000)
    vectors = unit_vectors(400, DIM, seed=6)
    actor = ShardActor(0, DIM, settings, str(tmp_path), MODEL)
    for start in range(0, 400, 50):
        actor.upsert([_write(i, vectors) for i in range(start, start + 50)])
    assert actor._shard.wait_for_rebuilds(timeout=120)
    (image,) = [s for s in actor.stats().indexes if s.modality is Modality.IMAGE]
    assert image.active_type == "IVF8,Flat"
    actor.snapshot()
    actor.delete(["doc-5"])  # after the snapshot: comes back from the log
    expected = _ids(actor, vectors[5], k=20)
    actor.close()

    again = ShardActor(0, DIM, settings, str(tmp_path), MODEL)
    (image,) = [s for s in again.stats().indexes if s.modality is Modality.IMAGE]
    assert image.active_type == "IVF8,Flat"  # no retraining: the trained index was loaded
    assert _ids(again, vectors[5], k=20) == expected and "doc-5" not in expected
    again.upsert([_write(5, vectors)])  # a mapped index takes writes (copied on first write)
    assert _ids(again, vectors[5], k=1) == ["doc-5"]
    again.close()
