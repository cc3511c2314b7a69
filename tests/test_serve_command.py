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

from clipsearch.client import Client

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


def test_serve_starts_answers_and_stops_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "--port", "0", "--demo-corpus", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        address = _wait_for_ready(proc, timeout_s=240)
        with Client(address, timeout=60) as client:
            assert client.stats().total_documents == 120
            hits = client.search("a red circle", top_k=5).hits
            assert all(h.metadata["color"] == "red" for h in hits[:3])
            assert all(h.publish_time.year >= 2026 for h in hits)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
