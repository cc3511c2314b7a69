"""The committed stubs are what the pinned generator makes from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    fresh = {p.name: p.read_text() for p in (tmp_path / "clipsearch" / "v1").iterdir()}
    committed = {p.name: p.read_text() for p in (ROOT / "clipsearch" / "v1").glob("*.py*")}
    assert set(fresh) == set(committed), "stub files differ: run `make proto`"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_every_service_method_is_documented() -> None:
    for proto in (ROOT / "protos" / "clipsearch" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.strip().startswith(("rpc ", "service ")):
                assert lines[n - 1].strip().startswith("//"), f"{proto.name}:{n + 1} undocumented"
