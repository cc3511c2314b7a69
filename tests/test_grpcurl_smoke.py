"""grpcurl, through server reflection only (no .proto files): what an operator types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _grpcurl(address: str, *args: str, data: dict | None = None) -> str:
    grpcurl = Path(sys.executable).parent / "grpcurl"  # from the test extras
    cmd = [str(grpcurl), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    proc = subprocess.run([*cmd, address, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reflection_describes_the_search_api(stack) -> None:  # type: ignore[no-untyped-def]
    described = _grpcurl(stack.address, "describe", "clipsearch.v1.SearchService")
    for rpc in ("Search", "Upsert", "Delete", "Get"):
        assert f"rpc {rpc} (" in described
    message = _grpcurl(stack.address, "describe", "clipsearch.v1.SearchRequest")
    assert "top_k" in message and "allow_partial" in message


def test_health_check_says_serving(stack) -> None:  # type: ignore[no-untyped-def]
    out = _grpcurl(
        stack.address,
        "grpc.health.v1.Health/Check",
        data={"service": "clipsearch.v1.SearchService"},
    )
    assert json.loads(out)["status"] == "SERVING"


def test_upsert_then_search_by_vector(stack) -> None:  # type: ignore[no-untyped-def]
    stats = json.loads(_grpcurl(stack.address, "clipsearch.v1.AdminService/Stats"))
    dim = stats["dimension"]
    vector = [1.0] + [0.0] * (dim - 1)
    doc = {"id": "curl-1", "image_vector": {"values": vector}, "caption": "from grpcurl"}
    upserted = _grpcurl(
        stack.address, "clipsearch.v1.SearchService/Upsert", data={"documents": [doc]}
    )
    assert json.loads(upserted)["upserted"] == 1
    found = json.loads(
        _grpcurl(
            stack.address,
            "clipsearch.v1.SearchService/Search",
            data={"vector": {"values": vector}, "top_k": 1},
        )
    )
    assert found["hits"][0]["id"] == "curl-1" and found["hits"][0]["caption"] == "from grpcurl"
