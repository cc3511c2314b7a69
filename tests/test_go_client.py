"""The Go client: its committed stubs are fresh, and its test passes against a live server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.devtools import ROOT, require

GO_CLIENT = ROOT / "clients/go"


def test_committed_go_stubs_are_fresh(tmp_path: Path) -> None:
    require("protoc-gen-go")
    require("protoc-gen-go-grpc")
    subprocess.run(
        [str(ROOT / "scripts/gen_go_stubs.sh"), str(tmp_path)],
        check=True,
        timeout=300,
    )
    fresh = sorted((tmp_path / "clipsearchv1").glob("*.go"))
    committed = sorted((GO_CLIENT / "clipsearchv1").glob("*.go"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    for new, old in zip(fresh, committed, strict=True):
        assert new.read_text() == old.read_text(), (
            f"{old.name} is stale: run scripts/gen_go_stubs.sh"
        )


@pytest.mark.integration
def test_go_client_against_live_server(stack) -> None:  # type: ignore[no-untyped-def]
    go = require("go")
    env = {**os.environ, "CLIPSEARCH_ADDR": stack.address, "GOTOOLCHAIN": "local"}
    proc = subprocess.run(
        [go, "test", "-count=1", "-v", "./..."],
        cwd=GO_CLIENT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in ("TestUpsertSearchDelete", "TestErrorsCarryStatusCodes"):
        assert f"--- PASS: {name}" in proc.stdout, proc.stdout[-4000:]
