"""The ghz load kit: report parsing, SLO checks, payloads, configs, and a short real run."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2

from load import payloads, run
from tests.devtools import ROOT, require

GHZ_CONFIGS = sorted((ROOT / "load/ghz").glob("*.json"))


def _report(count: int = 100, ok: int = 100, p50: float = 10.0, p99: float = 40.0) -> dict:
    ms = 1_000_000
    return {
        "count": count,
        "rps": 19.5,
        "statusCodeDistribution": {"OK": ok, "Unavailable": count - ok}
        if ok < count
        else {"OK": ok},
        "latencyDistribution": [
            {"percentage": 50, "latency": int(p50 * ms)},
            {"percentage": 95, "latency": int(p99 * 0.8 * ms)},
            {"percentage": 99, "latency": int(p99 * ms)},
        ],
    }


def test_summary_reads_ghz_units() -> None:
    s = run.summarize("search_text", "search_text", _report(count=200, ok=199, p50=12, p99=80))
    assert (s.count, s.rps) == (200, 19.5)
    assert s.error_rate == pytest.approx(0.005)
    assert (s.p50_ms, s.p99_ms) == pytest.approx((12.0, 80.0))
    assert s.statuses == {"OK": 199, "Unavailable": 1}


def test_slo_misses_name_each_broken_objective() -> None:
    slo = {
        "defaults": {"max_error_rate": 0.0, "min_requests": 10},
        "scenarios": {"x": {"p99_ms": 50}},
    }
    good = run.summarize("x", "x", _report(p99=40))
    assert run.slo_misses(good, slo) == []
    bad = run.summarize("x", "x", _report(count=100, ok=98, p99=60))
    misses = run.slo_misses(bad, slo)
    assert any("error rate 0.0200" in m for m in misses) and any("p99_ms 60.0" in m for m in misses)
    assert run.slo_misses(run.summarize("x", "x", _report(count=3, ok=3)), slo)
    assert run.slo_misses(run.summarize("x", "x", {}), slo), "an empty report must fail"


def test_the_checked_in_slo_covers_every_scenario() -> None:
    slo = yaml.safe_load((ROOT / "load/slo.yaml").read_text())
    assert set(slo["scenarios"]) == set(run.SCENARIOS)
    for limits in slo["scenarios"].values():
        assert {"p50_ms", "p99_ms"} <= set(limits)


def test_payloads_are_valid_messages_of_the_right_dimension() -> None:
    files = payloads.build(dim=128, n=8)
    assert set(files) == {f"{c.stem}.json" for c in GHZ_CONFIGS}
    vector = files["search_vector.json"][0]["vector"]["values"]
    assert len(vector) == 128 and sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-4)
    png = base64.b64decode(files["search_image.json"][0]["image"])
    assert png.startswith(b"\x89PNG")
    doc = files["upsert.json"][0]["documents"][0]
    assert doc["id"] == "load-{{.RequestNumber}}" and doc["text"] and doc["image"]


def test_every_ghz_config_names_a_real_method_and_its_data(tmp_path: Path) -> None:
    protoset = descriptor_pb2.FileDescriptorSet.FromString(
        payloads.write_protoset(tmp_path / "x.protoset").read_bytes()
    )
    methods = {
        f"{f.package}.{s.name}/{m.name}" for f in protoset.file for s in f.service for m in s.method
    }
    for path in GHZ_CONFIGS:
        config = json.loads(path.read_text())
        assert config["call"] in methods, path.name
        assert config["data-file"] == path.name and config["protoset"] == payloads.PROTOSET
        assert config["duration"] and config["rps"] and config["concurrency"], path.name
        assert config["duration-stop"] == "wait", "in-flight calls at the end are not errors"


@pytest.mark.integration
def test_ghz_smoke_run_meets_a_loose_slo(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CI's short real run: every scenario for 2 s against the live server, no errors."""
    require("ghz")
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        yaml.safe_dump({"defaults": {"max_error_rate": 0.0, "min_requests": 5, "p99_ms": 5000}})
    )
    results = tmp_path / "results"
    argv = [
        "--target",
        stack.address,
        "--duration",
        "2s",
        "--slo",
        str(slo),
        "--results",
        str(results),
    ]
    assert run.main(argv) == 0
    summary = json.loads((results / "summary.json").read_text())
    parts = {(s["scenario"], s["part"]) for s in summary["summaries"]}
    assert len(parts) == 4 + len(run.SCENARIOS["mixed"])
    assert summary["slo_misses"] == {}
    assert all(s["count"] >= 5 for s in summary["summaries"])


def test_a_token_travels_as_bearer_metadata(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []

    class FakeProc:
        returncode = 0

        def __init__(self, cmd: list[str], cwd: Path) -> None:
            calls.append(cmd)
            report = Path(cmd[cmd.index("-o") + 1])
            report.write_text(json.dumps(_report()))

        def wait(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(run.subprocess, "Popen", FakeProc)
    run.run_scenario("ghz", "search_text", "h:1", tmp_path, tmp_path, "1s", token="T0K")
    cmd = calls[0]
    assert json.loads(cmd[cmd.index("-m") + 1]) == {"authorization": "Bearer T0K"}
    assert cmd[-1] == "h:1" and cmd[cmd.index("-z") + 1] == "1s"
