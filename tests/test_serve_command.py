"""`clipsearch serve` as a newcomer runs it: a fresh process, embedded Ray, the demo corpus."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipsearch.client import Client, Document

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _wait_for_ready(proc: subprocess.Popen[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"ready on (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("server never became ready:\n" + "".join(seen[-40:]))


def _serve(
    data_dir: Path,
    *,
    demo_corpus: int = 120,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """`clipsearch serve` in a subprocess on a free port; `new_session` gives it its own
    process group so that leftovers can be killed together."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CLIPSEARCH_DATA_DIR": str(data_dir),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "--port", "0"]
        + ["--demo-corpus", str(demo_corpus)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=data_dir,
        start_new_session=new_session,
    )


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_answers_stops_cleanly_and_restarts_with_its_writes(tmp_path: Path) -> None:
    proc = _serve(tmp_path)
    try:
        with Client(_wait_for_ready(proc, timeout_s=240), timeout=60) as client:
            assert client.stats().total_documents == 120
            hits = client.search("a red circle", top_k=5).hits
            assert all(h.metadata["color"] == "red" for h in hits[:3])
            assert all(h.publish_time.year >= 2026 for h in hits)
            client.upsert([Document("mine", text="a tiny green star", metadata={"k": "v"})])
            client.delete(["demo-00000"])
    finally:
        assert _stop(proc) == 0
    proc = _serve(tmp_path)  # same data dir: the log brings back every acknowledged write
    try:
        with Client(_wait_for_ready(proc, timeout_s=240), timeout=60) as client:
            assert client.stats().total_documents == 120  # demo corpus not loaded twice
            (mine,) = client.get(["mine"])
            assert mine.caption == "a tiny green star" and mine.metadata == {"k": "v"}
            assert client.get(["demo-00000"], allow_missing=True) == []
    finally:
        assert _stop(proc) == 0
