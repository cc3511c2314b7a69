"""The shard write-ahead log: round trips, torn tails, corruption, fsync failure, kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter
from index_service.shard import Shard
from index_service.wal import (
    DeleteOp,
    LogCorruption,
    LogFailed,
    Op,
    UpsertOp,
    WriteAheadLog,
    replay,
)
from tests.fakes import unit_vectors

DIM = 8
ROOT = Path(__file__).resolve().parents[1]


def _write(doc_id: str, i: int, image: bool = True, text: bool = True, seed: int = 0) -> DocWrite:
    vecs = unit_vectors(2, DIM, seed * 1000 + i)
    return DocWrite(
        DocRecord(
            id=doc_id,
            publish_time=1.7e9 + i * 0.125,
            metadata={"lang": "fr" if i % 2 else "ja", "n": str(i % 3)},
            caption=f"légende {i} — 写真",
            has_image=image,
            has_text=text,
        ),
        image_vector=vecs[0] if image else None,
        text_vector=vecs[1] if text else None,
    )


def _assert_same_write(a: DocWrite, b: DocWrite) -> None:
    assert a.record == b.record
    for modality in Modality:
        va, vb = a.vector(modality), b.vector(modality)
        assert (va is None) == (vb is None)
        if va is not None and vb is not None:
            assert vb.dtype == np.float32
            np.testing.assert_array_equal(va.astype(np.float32), vb)


def _assert_same_op(sent: Op, got: Op) -> None:
    assert type(sent) is type(got)
    if isinstance(sent, DeleteOp):
        assert isinstance(got, DeleteOp)
        assert sent.ids == got.ids
        return
    assert isinstance(got, UpsertOp)
    assert len(sent.writes) == len(got.writes)
    for a, b in zip(sent.writes, got.writes, strict=True):
        _assert_same_write(a, b)


def _ops() -> list[Op]:
    return [
        UpsertOp((_write("ｉｄ-α", 0), _write("id/../etc", 1, text=False))),
        UpsertOp((_write("😀\u0000nul", 2, image=False),)),
        DeleteOp(("id/../etc", "never-stored")),
        UpsertOp(()),
        DeleteOp(()),
        UpsertOp((_write("ｉｄ-α", 3, seed=1), _write('q"uote\\', 4, image=False, text=False))),
    ]


def _log_with(path: Path, ops: list[Op]) -> list[int]:
    """Write ops one per append; return the file size after each."""
    sizes = []
    with WriteAheadLog(path) as wal:
        for op in ops:
            wal.append([op])
            sizes.append(path.stat().st_size)
    return sizes


# ---------------------------------------------------------------- round trip


def test_round_trip_in_order_with_increasing_seq(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "shard-0.wal"
    sent = _ops()
    with WriteAheadLog(path) as wal:
        assert wal.append(sent[:2]) == 2
        assert wal.append(sent[2:]) == len(sent)
        assert wal.append([]) == len(sent)
    got = list(replay(path))
    assert [op.seq for op in got] == list(range(1, len(sent) + 1))
    for a, b in zip(sent, got, strict=True):
        _assert_same_op(a, b)
    assert [op.seq for op in replay(path, after_seq=4)] == [5, 6]


def test_seq_continues_after_reopen_and_from_snapshot_base(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    with WriteAheadLog(path) as wal:
        wal.append(_ops()[:3])
    with WriteAheadLog(path) as wal:
        assert wal.recovery.records == 3 and wal.recovery.truncated_bytes == 0
        assert wal.last_seq == 3
        assert wal.append([DeleteOp(("x",))]) == 4
        assert [op.seq for op in wal.replay()] == [1, 2, 3, 4]
    with WriteAheadLog(tmp_path / "trimmed.wal", start_seq=41) as wal:
        assert wal.append([DeleteOp(("x",))]) == 42


def test_ids_never_reach_file_names(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    with WriteAheadLog(path) as wal:
        wal.append(_ops())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.wal"]


def test_prestamped_or_oversized_ops_are_refused_without_failing_the_log(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path / "shard.wal") as wal:
        with pytest.raises(ValueError, match="seq=0"):
            wal.append([DeleteOp(("a",), seq=7)])
        assert wal.append([DeleteOp(("a",))]) == 1


def test_rebuilt_shard_answers_like_the_original(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    original = Shard(0, DIM)
    batches: list[Op] = [
        UpsertOp(tuple(_write(f"d{i}", i, text=i % 3 != 0) for i in range(40))),
        DeleteOp(tuple(f"d{i}" for i in range(0, 40, 7))),
        UpsertOp(tuple(_write(f"d{i}", i, seed=2) for i in range(30, 50))),
        DeleteOp(("d45", "nope")),
    ]
    with WriteAheadLog(path) as wal:
        for op in batches:
            wal.append([op])
            if isinstance(op, UpsertOp):
                original.upsert(op.writes)
            else:
                original.delete(op.ids)
    rebuilt = Shard(0, DIM)
    for op in replay(path):
        if isinstance(op, UpsertOp):
            rebuilt.upsert(op.writes)
        else:
            rebuilt.delete(op.ids)
    assert original.stats() == rebuilt.stats()
    ids = [f"d{i}" for i in range(55)]
    assert original.get(ids) == rebuilt.get(ids)
    for q in unit_vectors(5, DIM, seed=99):
        for modality in Modality:
            for flt in (None, SearchFilter(metadata_equals=(("lang", "fr"),))):
                a = original.search(modality, q, 10, flt)
                b = rebuilt.search(modality, q, 10, flt)
                assert a.records == b.records
                np.testing.assert_array_equal(a.similarities, b.similarities)


# ---------------------------------------------------------------- torn tails


def test_torn_tail_at_every_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    ops = _ops()[:4]
    sizes = _log_with(path, ops)
    full = path.read_bytes()
    for cut in range(len(full)):
        path.write_bytes(full[:cut])
        complete = sum(1 for s in sizes if s <= cut)
        kept = sizes[complete - 1] if complete else 0
        with WriteAheadLog(path) as wal:
            assert wal.recovery.records == complete, cut
            assert wal.recovery.truncated_bytes == cut - kept
            assert path.stat().st_size == kept
            assert wal.append([DeleteOp(("after",))]) == complete + 1
        got = list(replay(path))
        assert [op.seq for op in got] == list(range(1, complete + 2))
        for a, b in zip(ops[:complete], got, strict=False):
            _assert_same_op(a, b)


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    sizes = _log_with(path, _ops()[:2])
    with open(path, "ab") as f:
        f.write(bytes(300))
    with WriteAheadLog(path) as wal:
        assert wal.recovery.records == 2
        assert wal.recovery.truncated_bytes == 300
    assert path.stat().st_size == sizes[-1]


def test_flipped_byte_in_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "shard.wal"
    sizes = _log_with(path, _ops()[:3])
    full = path.read_bytes()
    for pos in range(sizes[1], sizes[2]):
        damaged = bytearray(full)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        with WriteAheadLog(path) as wal:
            assert wal.recovery.records == 2, pos
            assert path.stat().st_size == sizes[1]
            assert wal.append([DeleteOp(("z",))]) == 3


# ---------------------------------------------------------------- corruption


def test_flipped_byte_in_a_middle_record_refuses_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "shard-3.wal"
    sizes = _log_with(path, _ops()[:4])
    full = path.read_bytes()
    start, end = sizes[0], sizes[1]
    for pos in range(start, end):
        damaged = bytearray(full)
        damaged[pos] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(LogCorruption) as caught:
            WriteAheadLog(path)
        assert caught.value.offset == start, pos
        assert caught.value.file_name == "shard-3.wal"
        assert f"shard-3.wal is corrupt at byte {start}" in str(caught.value)
        assert str(tmp_path) not in str(caught.value)
        assert path.read_bytes() == bytes(damaged), "a refused log must not be modified"
        with pytest.raises(LogCorruption):
            list(replay(path))


# ---------------------------------------------------------------- disk errors


def test_failed_fsync_raises_and_fails_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shard.wal"
    wal = WriteAheadLog(path)
    wal.append([DeleteOp(("a",))])

    def broken_fsync(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        wal.append([DeleteOp(("b",))])
    monkeypatch.undo()
    with pytest.raises(LogFailed):
        wal.append([DeleteOp(("c",))])
    with pytest.raises(LogFailed):
        wal.append([])
    wal.close()
    # Recovery goes through the file; the un-acked record may or may not be there ("in doubt").
    with WriteAheadLog(path) as reopened:
        assert [op.seq for op in reopened.replay()][:1] == [1]


def test_failed_write_fails_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal = WriteAheadLog(tmp_path / "shard.wal")

    def no_space(_fd: int, _data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError, match="No space"):
        wal.append([DeleteOp(("a",))])
    monkeypatch.undo()
    with pytest.raises(LogFailed):
        wal.append([DeleteOp(("a",))])
    wal.close()


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "shard.wal")
    wal.close()
    wal.close()
    with pytest.raises(LogFailed, match="closed"):
        wal.append([DeleteOp(("a",))])


# ---------------------------------------------------------------- kill -9

_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from clipsearch.types import DocRecord, DocWrite
    from index_service.wal import DeleteOp, UpsertOp, WriteAheadLog

    wal = WriteAheadLog(Path(sys.argv[1]))
    vec = np.ones(8, dtype=np.float32)
    for i in range(100_000):
        if i % 5 == 4:
            ops = [DeleteOp((f"k{i - 1}",))]
        else:
            rec = DocRecord(id=f"k{i}", publish_time=float(i), caption="x" * (i % 97))
            ops = [UpsertOp((DocWrite(rec, image_vector=vec * i),)) for _ in range(1 + i % 3)]
        print(wal.append(ops), flush=True)
    """
)


def _run_until_killed(script: Path, path: Path, rng: random.Random) -> list[int]:
    """Start the writer, SIGKILL it after a random number of acks; return the acked seqs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    seen = ""
    try:
        assert proc.stdout is not None
        for _ in range(rng.randint(1, 300)):
            line = proc.stdout.readline()
            seen += line
            if not line:
                break
        time.sleep(rng.random() * 0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Only whole lines were printed after append returned: they are the acknowledged seqs.
    return [int(line) for line in (seen + out).split("\n")[:-1]]


def test_acked_writes_survive_kill_9(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_CHILD)
    path = tmp_path / "shard.wal"
    rng = random.Random(20240611)
    all_acked: list[int] = []
    for _ in range(5):
        acked = _run_until_killed(script, path, rng)
        assert acked, "the writer acknowledged nothing before it was killed"
        all_acked += acked
        with WriteAheadLog(path) as wal:
            seqs = [op.seq for op in wal.replay()]
        assert seqs == list(range(1, len(seqs) + 1))
        missing = set(all_acked) - set(seqs)
        assert not missing, f"acknowledged then lost: {sorted(missing)[:10]}"
