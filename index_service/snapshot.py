"""Atomic, checksummed snapshots of one shard (design rules 2 and 3).

A snapshot is a directory ``snap-<seq>`` holding the files `Shard.save` wrote plus
``MANIFEST.json``: the sequence number the state covers, the shard's identity (dim, model,
factory) and, for every file, its size and sha256. It is built under a temporary name, every
file and the directory are fsync'd, and only then is it renamed into place (and the parent
directory fsync'd), so a crash leaves either a whole snapshot or an ignorable temp directory.

Before anything is handed to Faiss, `SnapshotStore.verified` re-checks sizes and checksums:
on faiss 1.15 most bit flips and an absurd header load silently, so Faiss itself is never the
one to notice (RELIABILITY.md). A damaged snapshot is reported and skipped; the caller falls
back to an older snapshot or to the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_service.wal import fsync_path

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_FORMAT = 1
_NAME = re.compile(r"snap-(\d{20})")
_CHUNK = 1 << 20


class SnapshotInvalid(Exception):
    """A snapshot directory failed verification; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A verified snapshot: the state after every op with sequence <= `seq`."""

    path: Path
    seq: int
    info: dict[str, Any]


# Two names for one call, so that a test can tell file syncs from directory syncs apart.
fsync_dir = fsync_path
_fsync_file = fsync_path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_name(seq: int) -> str:
    """Directory name of the snapshot covering `seq` (zero-padded: names sort by seq)."""
    return f"snap-{seq:020d}"


class SnapshotStore:
    """The snapshots of one shard, newest kept, older ones pruned down to `keep`."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Half-written snapshots of a crashed process: never renamed, so never valid."""
        for entry in self.directory.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)

    def sequences(self) -> list[int]:
        """Sequence numbers of the snapshot directories present, newest first (unverified)."""
        found = [
            int(m.group(1)) for e in self.directory.iterdir() if (m := _NAME.fullmatch(e.name))
        ]
        return sorted(found, reverse=True)

    def write(self, seq: int, save: Callable[[Path], None], info: dict[str, Any]) -> Snapshot:
        """Build a snapshot of the state at `seq` with `save(dir)`, durably, then prune.

        Returns once the snapshot is renamed into place and the rename is on disk.
        """
        final = self.directory / snapshot_name(seq)
        if final.exists():
            return self._verify(final)
        tmp = self.directory / f".tmp-{snapshot_name(seq)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save(tmp)
            files = {}
            for entry in sorted(tmp.iterdir()):
                if not entry.is_file():
                    raise ValueError(f"snapshot writer left a non-file {entry.name!r}")
                _fsync_file(entry)
                files[entry.name] = {"size": entry.stat().st_size, "sha256": _sha256(entry)}
            manifest = {"format": _FORMAT, "seq": seq, "info": info, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_file(tmp / MANIFEST)
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return Snapshot(final, seq, info)

    def _prune(self) -> None:
        for seq in self.sequences()[self.keep :]:
            shutil.rmtree(self.directory / snapshot_name(seq), ignore_errors=True)
        fsync_dir(self.directory)

    def verified(self) -> Iterator[Snapshot]:
        """Snapshots that pass verification, newest first; damaged ones are logged, skipped."""
        for seq in self.sequences():
            try:
                yield self._verify(self.directory / snapshot_name(seq))
            except SnapshotInvalid as exc:
                log.error("%s; falling back to an older snapshot or the log", exc)

    def trim_point(self) -> int | None:
        """The sequence the log may be trimmed up to, or None to keep all of it.

        That is the oldest snapshot kept, and only once `keep` (>= 2) exist: the log must
        reach back far enough to recover when the newest snapshot turns out damaged, either
        from an older snapshot or, while there is just one, from the very first record.
        """
        seqs = self.sequences()
        return seqs[-1] if len(seqs) >= max(2, self.keep) else None

    def _verify(self, path: Path) -> Snapshot:
        where = f"snapshot {path.name}"
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise SnapshotInvalid(f"{where} has no {MANIFEST}") from exc
        except (OSError, ValueError) as exc:
            raise SnapshotInvalid(f"{where}: unreadable {MANIFEST} ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise SnapshotInvalid(f"{where}: unknown manifest format")
        seq = manifest.get("seq")
        match = _NAME.fullmatch(path.name)
        if not isinstance(seq, int) or match is None or int(match.group(1)) != seq:
            raise SnapshotInvalid(f"{where}: manifest sequence {seq!r} does not match the name")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise SnapshotInvalid(f"{where}: manifest lists no files")
        present = {e.name for e in path.iterdir()} - {MANIFEST}
        if present != set(files):
            raise SnapshotInvalid(
                f"{where}: files {sorted(present)} do not match the manifest {sorted(files)}"
            )
        for name, expected in files.items():
            file = path / name
            size = file.stat().st_size
            if size != expected.get("size"):
                raise SnapshotInvalid(
                    f"{where}: {name} has {size} bytes, the manifest says {expected.get('size')}"
                )
            if _sha256(file) != expected.get("sha256"):
                raise SnapshotInvalid(f"{where}: {name} fails its sha256 checksum")
        info = manifest.get("info")
        return Snapshot(path, seq, info if isinstance(info, dict) else {})
