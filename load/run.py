"""The ghz load kit: run scenarios against a server and check them against the SLO file.

Without --target it starts the embedded server (`clipsearch serve` on a free loopback port,
demo corpus) and stops it afterwards. Each scenario is one or more ghz runs (the configs in
load/ghz/, fixed concurrency and rate, bounded duration); `mixed` runs several at once.
ghz's JSON reports and a summary land in --results; the exit status is 1 when any SLO in
load/slo.yaml is missed.

    python -m load.run                                  # what `make load` runs
    python -m load.run --target my-gateway:50051 --scenarios search_text,mixed

A gateway with auth wants a token (CLIPSEARCH_TOKEN or --token) with the read and admin
roles (Stats gives the vector dimension; or pass --dim), and write for upsert and mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from load import payloads

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCENARIOS: dict[str, tuple[str, ...]] = {
    "search_text": ("search_text",),
    "search_vector": ("search_vector",),
    "search_image": ("search_image",),
    "upsert": ("upsert",),
    "mixed": ("search_text", "search_vector", "search_image", "upsert"),
}
MIXED_RATE_SHARE = 0.5  # each part of `mixed` runs at this share of its own config's rate
_READY = re.compile(r"clipsearch is ready on (\S+)")


@dataclass(frozen=True)
class Summary:
    """What a ghz JSON report says, in the units the SLO file uses."""

    scenario: str
    part: str
    count: int
    rps: float
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    statuses: dict[str, int]


def summarize(scenario: str, part: str, report: dict[str, Any]) -> Summary:
    """Reduce one ghz JSON report to the figures the SLOs are written in."""
    count = int(report.get("count", 0))
    statuses = {str(k): int(v) for k, v in (report.get("statusCodeDistribution") or {}).items()}
    ok = statuses.get("OK", 0)
    latencies = report.get("latencyDistribution") or []
    pct = {int(d["percentage"]): d["latency"] / 1e6 for d in latencies}
    return Summary(
        scenario=scenario,
        part=part,
        count=count,
        rps=float(report.get("rps", 0.0)),
        error_rate=1.0 if count == 0 else (count - ok) / count,
        p50_ms=pct.get(50, float("inf")),
        p95_ms=pct.get(95, float("inf")),
        p99_ms=pct.get(99, float("inf")),
        statuses=statuses,
    )


def slo_misses(summary: Summary, slo: dict[str, Any]) -> list[str]:
    """Every way `summary` misses the SLO of its scenario (empty list: met)."""
    limits = {**slo.get("defaults", {}), **slo.get("scenarios", {}).get(summary.scenario, {})}
    misses = []
    if summary.count < int(limits.get("min_requests", 1)):
        misses.append(f"{summary.count} requests < min_requests {limits.get('min_requests', 1)}")
    if summary.error_rate > float(limits.get("max_error_rate", 0.0)):
        misses.append(
            f"error rate {summary.error_rate:.4f} > {limits.get('max_error_rate', 0.0)} "
            f"(statuses {summary.statuses})"
        )
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        if key in limits and getattr(summary, key) > float(limits[key]):
            misses.append(f"{key} {getattr(summary, key):.1f} > {limits[key]}")
    return misses


def find_ghz() -> str:
    """ghz from $GHZ, the pinned tools cache (scripts/dev_tools.sh), or PATH."""
    tools = os.environ.get("CLIPSEARCH_TOOLS", str(Path.home() / ".cache/clipsearch/tools"))
    candidates = [os.environ.get("GHZ", ""), f"{tools}/bin/ghz"]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    found = shutil.which("ghz")
    if found is None:
        sys.exit("ghz not found: run scripts/dev_tools.sh ghz (or set GHZ=/path/to/ghz)")
    return found


def run_scenario(
    ghz: str,
    scenario: str,
    target: str,
    payload_dir: Path,
    results: Path,
    duration: str | None,
    token: str | None = None,
) -> list[Summary]:
    """Run the ghz configs of one scenario (at once, for `mixed`) and summarize each."""
    procs = []
    for part in SCENARIOS[scenario]:
        config = HERE / "ghz" / f"{part}.json"
        report = results / (f"{scenario}.{part}.json" if scenario == "mixed" else f"{part}.json")
        cmd = [ghz, "--config", str(config), "-O", "json", "-o", str(report)]
        if duration:
            cmd += ["-z", duration]
        if scenario == "mixed":
            rate = json.loads(config.read_text())["rps"]
            cmd += ["--rps", str(max(1, round(rate * MIXED_RATE_SHARE)))]
        if token:
            cmd += ["-m", json.dumps({"authorization": f"Bearer {token}"})]
        cmd.append(target)
        procs.append((part, report, subprocess.Popen(cmd, cwd=payload_dir)))
    out = []
    for part, report, proc in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"ghz {scenario}/{part} exited with {proc.returncode}")
        out.append(summarize(scenario, part, json.loads(report.read_text())))
    return out


@contextmanager
def embedded_server(log_path: Path, timeout: float = 300.0) -> Iterator[str]:
    """`clipsearch serve` on a free loopback port with the demo corpus; yields host:port."""
    data_dir = tempfile.mkdtemp(prefix="csload-")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLIPSEARCH_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "clipsearch.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            yield _wait_ready(proc, timeout)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(data_dir, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if match := _READY.search(line):
            return match.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"the server did not become ready (exit code {proc.poll()})")


def print_table(summaries: list[Summary]) -> None:
    """One line per ghz run: the figures the README quotes."""
    print(
        f"{'scenario':<28} {'requests':>8} {'rps':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7}"
    )
    for s in summaries:
        name = s.scenario if s.scenario == s.part else f"{s.scenario}/{s.part}"
        print(
            f"{name:<28} {s.count:>8} {s.rps:>7.1f} {s.p50_ms:>8.1f} {s.p95_ms:>8.1f} "
            f"{s.p99_ms:>8.1f} {s.error_rate:>7.2%}"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (0: every SLO met)."""
    args = _parser().parse_args(argv)
    names = args.scenarios.split(",")
    unknown = set(names) - SCENARIOS.keys()
    if unknown:
        sys.exit(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    slo = yaml.safe_load(args.slo.read_text())
    ghz = find_ghz()
    args.results = args.results.resolve()  # ghz runs in the payload directory
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _target(args) as target:
        payload_dir = args.results / "payloads"
        dim = args.dim or payloads.server_dimension(target, args.token)
        payloads.write(payload_dir, dim)
        summaries = [
            s
            for name in names
            for s in run_scenario(
                ghz, name, target, payload_dir, args.results, args.duration, args.token
            )
        ]
    print_table(summaries)
    misses = {f"{s.scenario}/{s.part}": m for s in summaries if (m := slo_misses(s, slo))}
    (args.results / "summary.json").write_text(
        json.dumps({"summaries": [asdict(s) for s in summaries], "slo_misses": misses}, indent=2)
    )
    print(f"load kit took {time.perf_counter() - started:.0f} s; reports in {args.results}")
    for name, problems in misses.items():
        print(f"SLO MISSED {name}: " + "; ".join(problems))
    return 1 if misses else 0


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[str]:
    if args.target:
        yield args.target
    else:
        with embedded_server(args.results / "server.log") as address:
            yield address


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--duration", help="override every config's duration, e.g. 3s")
    parser.add_argument("--slo", type=Path, default=HERE / "slo.yaml")
    parser.add_argument("--results", type=Path, default=Path("load-results"))
    parser.add_argument(
        "--token",
        default=os.environ.get("CLIPSEARCH_TOKEN"),
        help="bearer token sent with every call (default $CLIPSEARCH_TOKEN)",
    )
    parser.add_argument("--dim", type=int, help="vector dimension (default: from Stats)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
