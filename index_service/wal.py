"""Append-only, fsync'd operation log for one shard (design rules 1, 2, 4 and 9).

A write is acknowledged only after `WriteAheadLog.append` returns, i.e. after its record is
on disk (one fsync per call: group commit). On open the log is scanned: a torn tail (a record
that was being written when the process or machine died, hence never acknowledged) is cut off
durably; a damaged record with valid records after it means acknowledged data is at risk, so
opening refuses with `LogCorruption` naming the file and byte offset instead of guessing.

Frame of one record, little-endian::

    length u32 | crc32(payload) u32 | payload (length bytes)

Payload (no pickle: data on disk must never be able to run code)::

    version u8 | kind u8 | seq u64 | body
    kind 1 (upsert): json_len u32 | json (ASCII) | float32 vectors, in record order,
                     image before text, each of the dimension the JSON names
    kind 2 (delete): json (ASCII) list of ids

JSON is written with `ensure_ascii`, so no control byte can appear in it and a frame cannot
hide inside a caption and be mistaken for a record. Ids only ever live inside payloads, never
in file names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from clipsearch.types import DocRecord, DocWrite

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<BBQ")
_JSON_LEN = struct.Struct("<I")
_VERSION = 1
_KIND_UPSERT = 1
_KIND_DELETE = 2
_F32 = np.dtype("<f4")
# Below 0x20000000 so that a length field always holds a byte < 0x20, which ASCII JSON never
# contains: a frame cannot be forged inside a caption or metadata value.
MAX_PAYLOAD = 256 * 1024 * 1024
_MIN_PAYLOAD = _HEAD.size


class LogError(Exception):
    """Base class of write-ahead log failures."""


class LogCorruption(LogError):
    """A damaged record sits before valid ones: acknowledged writes may be lost.

    The shard must not serve (rule 2); an operator restores from a replica or snapshot.
    """

    def __init__(self, file_name: str, offset: int, reason: str) -> None:
        super().__init__(f"write-ahead log {file_name} is corrupt at byte {offset}: {reason}")
        self.file_name = file_name
        self.offset = offset
        self.reason = reason


class LogFailed(LogError):
    """An earlier write or fsync failed; the log takes no more appends (rule 4).

    Retrying an fsync can report success for data the kernel already dropped, so the only
    safe way on is to discard this object, and recover the shard from the file on disk.
    """


@dataclass(frozen=True, slots=True)
class UpsertOp:
    """Store these documents (whole-document replace). seq 0 = not yet logged."""

    writes: tuple[DocWrite, ...]
    seq: int = 0


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Remove these ids. seq 0 = not yet logged."""

    ids: tuple[str, ...]
    seq: int = 0


Op = UpsertOp | DeleteOp


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening the log found: valid records, their last seq, and bytes cut off."""

    records: int
    last_seq: int
    truncated_bytes: int


@dataclass(slots=True)
class _Scan:
    """Result of reading a log up to its first bad or missing record."""

    ops: list[Op] = field(default_factory=list)
    valid_end: int = 0
    last_seq: int = 0


# ---------------------------------------------------------------- encoding


def _vector_bytes(vector: np.ndarray | None) -> tuple[int | None, bytes]:
    """Dimension and little-endian float32 bytes; (None, b"") when absent."""
    if vector is None:
        return None, b""
    flat = np.ascontiguousarray(vector, dtype=_F32).reshape(-1)
    return int(flat.shape[0]), flat.tobytes()


def _record_json(record: DocRecord, image_dim: int | None, text_dim: int | None) -> dict[str, Any]:
    return {
        "id": record.id,
        "t": record.publish_time,
        "m": dict(record.metadata),
        "c": record.caption,
        "hi": record.has_image,
        "ht": record.has_text,
        "di": image_dim,
        "dt": text_dim,
    }


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def encode_payload(op: Op) -> bytes:
    """The payload of one stamped op (seq > 0)."""
    if isinstance(op, DeleteOp):
        return _HEAD.pack(_VERSION, _KIND_DELETE, op.seq) + _dumps(list(op.ids))
    rows, blobs = [], []
    for write in op.writes:
        image_dim, image = _vector_bytes(write.image_vector)
        text_dim, text = _vector_bytes(write.text_vector)
        rows.append(_record_json(write.record, image_dim, text_dim))
        blobs += [image, text]
    meta = _dumps(rows)
    head = _HEAD.pack(_VERSION, _KIND_UPSERT, op.seq) + _JSON_LEN.pack(len(meta))
    return b"".join([head, meta, *blobs])


def _take_vector(body: memoryview, pos: int, dim: Any) -> tuple[np.ndarray | None, int]:
    if dim is None:
        return None, pos
    if not isinstance(dim, int) or dim < 0:
        raise ValueError(f"bad vector dimension {dim!r}")
    end = pos + dim * _F32.itemsize
    if end > len(body):
        raise ValueError("vector bytes run past the record")
    return np.frombuffer(body[pos:end], dtype=_F32).astype(np.float32), end


def _decode_upsert(seq: int, body: memoryview) -> UpsertOp:
    if len(body) < _JSON_LEN.size:
        raise ValueError("upsert record too short")
    (meta_len,) = _JSON_LEN.unpack_from(body)
    pos = _JSON_LEN.size + meta_len
    rows = json.loads(bytes(body[_JSON_LEN.size : pos]).decode("ascii"))
    writes = []
    for row in rows:
        image, pos = _take_vector(body, pos, row["di"])
        text, pos = _take_vector(body, pos, row["dt"])
        record = DocRecord(
            id=str(row["id"]),
            publish_time=float(row["t"]),
            metadata={str(k): str(v) for k, v in row["m"].items()},
            caption=str(row["c"]),
            has_image=bool(row["hi"]),
            has_text=bool(row["ht"]),
        )
        writes.append(DocWrite(record, image_vector=image, text_vector=text))
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} unexplained bytes after the vectors")
    return UpsertOp(tuple(writes), seq)


def decode_payload(payload: bytes | memoryview) -> Op:
    """One op from a payload whose crc matched; ValueError when it does not make sense."""
    view = memoryview(payload)
    if len(view) < _HEAD.size:
        raise ValueError("record shorter than its header")
    version, kind, seq = _HEAD.unpack_from(view)
    if version != _VERSION:
        raise ValueError(f"unknown record version {version}")
    if seq <= 0:
        raise ValueError(f"sequence number {seq} is not positive")
    body = view[_HEAD.size :]
    if kind == _KIND_UPSERT:
        return _decode_upsert(seq, body)
    if kind == _KIND_DELETE:
        ids = json.loads(bytes(body).decode("ascii"))
        if not isinstance(ids, list):
            raise ValueError("delete record does not hold a list")
        return DeleteOp(tuple(str(i) for i in ids), seq)
    raise ValueError(f"unknown record kind {kind}")


def frame(payload: bytes) -> bytes:
    """length | crc32 | payload."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


# ---------------------------------------------------------------- reading


def _parse_at(data: memoryview, pos: int) -> tuple[Op, int] | None:
    """The op framed at `pos` and the offset after it, or None if no valid record is there."""
    if pos + _FRAME.size > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, pos)
    end = pos + _FRAME.size + length
    if not _MIN_PAYLOAD <= length <= MAX_PAYLOAD or end > len(data):
        return None
    payload = data[pos + _FRAME.size : end]
    if payload[0] != _VERSION or payload[1] not in (_KIND_UPSERT, _KIND_DELETE):
        return None
    if zlib.crc32(payload) != crc:
        return None
    try:
        return decode_payload(payload), end
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None


def _valid_record_after(data: memoryview, start: int) -> int | None:
    """Offset of the first valid record at or after `start` (proof of mid-log corruption)."""
    for pos in range(start, len(data) - _FRAME.size - _MIN_PAYLOAD + 1):
        if _parse_at(data, pos) is not None:
            return pos
    return None


def _scan(data: memoryview, name: str) -> _Scan:
    """Parse records in order; raise LogCorruption if a bad one is followed by a good one."""
    scan = _Scan()
    pos = 0
    while pos < len(data):
        parsed = _parse_at(data, pos)
        if parsed is None:
            found = _valid_record_after(data, pos + 1)
            if found is not None:
                raise LogCorruption(name, pos, f"damaged record; a valid record follows at {found}")
            break
        op, end = parsed
        if op.seq <= scan.last_seq:
            raise LogCorruption(name, pos, f"sequence {op.seq} after {scan.last_seq}")
        pos = end
        scan.ops.append(op)
        scan.last_seq, scan.valid_end = op.seq, pos
    return scan


def _read_all(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def replay(path: Path, after_seq: int = 0) -> Iterator[Op]:
    """Ops in `path` with seq > after_seq, in order, without modifying the file.

    A torn tail ends the stream quietly (it was never acknowledged); corruption before valid
    records raises LogCorruption before anything is yielded, so nothing is half-applied.
    """
    scan = _scan(memoryview(_read_all(path)), path.name)
    return (op for op in scan.ops if op.seq > after_seq)


# ---------------------------------------------------------------- writing


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's entries (created, renamed, removed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class WriteAheadLog:
    """The log of one shard. Not thread-safe: the shard actor serialises appends.

    `start_seq` is the sequence a snapshot already covers (rule 2), so numbering continues
    after the log has been trimmed to empty.
    """

    def __init__(self, path: Path, start_seq: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recovery = self._recover()
        self._last_seq = max(self.recovery.last_seq, start_seq)
        self._failed: BaseException | None = None
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    @property
    def last_seq(self) -> int:
        """Sequence of the newest durable record (or of the snapshot base)."""
        return self._last_seq

    def _recover(self) -> Recovery:
        """Validate the file, cut a torn tail durably, and create the file if missing."""
        created = not self.path.exists()
        with open(self.path, "ab+") as f:
            f.seek(0)
            data = f.read()
            scan = _scan(memoryview(data), self.path.name)
            cut = len(data) - scan.valid_end
            if cut:
                self._truncate(f, scan.valid_end, cut)
        if created:
            fsync_path(self.path.parent)
        return Recovery(len(scan.ops), scan.last_seq, cut)

    def _truncate(self, f: BinaryIO, size: int, cut: int) -> None:
        log.warning(
            "write-ahead log %s: cut a torn tail of %d bytes at offset %d",
            self.path.name,
            cut,
            size,
        )
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())

    def append(self, ops: Sequence[Op]) -> int:
        """Log ops (one record each, one fsync) and return the last seq; then ack is allowed.

        Ops come with seq 0 and are numbered here. Encoding errors raise ValueError and leave
        the log usable; any OSError while writing or syncing fails the log for good.
        """
        fd = self._usable_fd()
        if any(op.seq != 0 for op in ops):
            raise ValueError("ops are numbered by the log: pass seq=0")
        data = self._encode(ops)
        if not data:
            return self._last_seq
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException as exc:
            self._failed = exc
            raise
        self._last_seq += len(ops)
        return self._last_seq

    def _usable_fd(self) -> int:
        if self._failed is not None:
            raise LogFailed(f"write-ahead log {self.path.name} failed earlier") from self._failed
        if self._fd is None:
            raise LogFailed(f"write-ahead log {self.path.name} is closed")
        return self._fd

    def _encode(self, ops: Sequence[Op]) -> bytes:
        frames = []
        for n, op in enumerate(ops, start=1):
            payload = encode_payload(replace(op, seq=self._last_seq + n))
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"record of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
            frames.append(frame(payload))
        return b"".join(frames)

    def replay(self, after_seq: int = 0) -> Iterator[Op]:
        """Ops on disk with seq > after_seq, in order (see module function `replay`)."""
        return replay(self.path, after_seq)

    def close(self) -> None:
        """Release the file; later appends raise LogFailed. Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- segments


_SEGMENT = re.compile(r"wal-(\d{20})\.log")
LEGACY_LOG = "wal.log"


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has sequence `first_seq`."""
    return f"wal-{first_seq:020d}.log"


class ShardLog:
    """A shard's log as a chain of segments, cut where snapshots are taken (rule 3).

    Records are only ever appended to the newest segment. After a snapshot covering every
    record so far is durable, `rotate` starts a new segment and `trim` deletes segments whose
    records all lie at or below the oldest snapshot still kept, so the chain always reaches
    back to a snapshot that can be loaded.
    """

    def __init__(self, directory: Path, base_seq: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        legacy = self.directory / LEGACY_LOG
        if legacy.exists():  # one-file logs of earlier versions start at sequence 1
            os.rename(legacy, self.directory / segment_name(1))
            fsync_path(self.directory)
        segments = self.segments()
        active = segments[-1][1] if segments else self.directory / segment_name(base_seq + 1)
        self._wal = WriteAheadLog(active, start_seq=base_seq)

    def segments(self) -> list[tuple[int, Path]]:
        """(first sequence, path) of every segment, oldest first."""
        found = [
            (int(m.group(1)), e)
            for e in self.directory.iterdir()
            if (m := _SEGMENT.fullmatch(e.name))
        ]
        return sorted(found)

    @property
    def last_seq(self) -> int:
        """Sequence of the newest durable record."""
        return self._wal.last_seq

    @property
    def recovery(self) -> Recovery:
        """What opening the active segment found (torn tail cut, records)."""
        return self._wal.recovery

    def append(self, ops: Sequence[Op]) -> int:
        """Log ops durably (see `WriteAheadLog.append`); returns the last seq."""
        return self._wal.append(ops)

    def rotate(self) -> None:
        """Continue in a new segment starting after the last record."""
        nxt = self.directory / segment_name(self._wal.last_seq + 1)
        if nxt == self._wal.path:
            return
        last = self._wal.last_seq
        self._wal.close()
        self._wal = WriteAheadLog(nxt, start_seq=last)

    def trim(self, keep_after: int) -> int:
        """Delete closed segments whose records all have seq <= keep_after; returns how many."""
        segments = self.segments()
        removed = 0
        for (_, path), (next_first, _) in zip(segments, segments[1:], strict=False):
            if next_first - 1 <= keep_after and path != self._wal.path:
                path.unlink()
                removed += 1
        if removed:
            fsync_path(self.directory)
        return removed

    def replay(self, after_seq: int = 0) -> Iterator[Op]:
        """Every op with seq > after_seq across segments, in order, with no gap.

        A missing range (a lost or damaged segment) raises LogCorruption before any op of
        the gap's far side is yielded; a torn tail of the newest segment ends it quietly.
        """
        expected = after_seq + 1
        for _, path in self.segments():
            for op in replay(path, after_seq):
                if op.seq != expected:
                    raise LogCorruption(
                        path.name,
                        0,
                        f"records {expected}..{op.seq - 1} are missing from the log "
                        "(and from every valid snapshot)",
                    )
                expected += 1
                yield op

    def close(self) -> None:
        """Release the active segment."""
        self._wal.close()

    def destroy(self) -> None:
        """Delete every segment (the shard is being cleared) and start over at sequence 1."""
        self._wal.close()
        for _, path in self.segments():
            path.unlink()
        fsync_path(self.directory)
        self._wal = WriteAheadLog(self.directory / segment_name(1))
