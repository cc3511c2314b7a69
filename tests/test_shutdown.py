"""Graceful shutdown on SIGTERM: health NOT_SERVING, new calls refused, in-flight calls
finish, exit 0 — in a real subprocess whose shard is slow on purpose."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.v1 import search_pb2, search_pb2_grpc
from index_service.shard import Shard
from tests.fakes import LocalShard
from tests.gateway_harness import DIM, code_of, gateway

ROOT = Path(__file__).resolve().parent.parent
SLOW_S = 1.5


class SlowShard(LocalShard):
    def __init__(self, number: int, delay_s: float) -> None:
        super().__init__(Shard(number, DIM))
        self.delay_s = delay_s

    async def search(self, *args: object) -> object:  # type: ignore[override]
        await asyncio.sleep(self.delay_s)
        return await super().search(*args)  # type: ignore[arg-type]


async def _main() -> None:
    """The subprocess: a gateway with slow shards, served until SIGTERM."""
    from gateway.server import serve_until_signal

    async with gateway(shards=[SlowShard(0, SLOW_S), SlowShard(1, SLOW_S)], grace_s=20) as (
        port,
        health,
    ):
        print(f"ready on 127.0.0.1:{port}", flush=True)
        await serve_until_signal(health.server, health, grace_s=20)
        print("drained", flush=True)


def _request() -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(vector={"values": np.ones(DIM).tolist()}, top_k=1)


async def test_sigterm_lets_in_flight_calls_finish_refuses_new_ones_and_exits_0() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, tests.test_shutdown as t; asyncio.run(t._main())"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for _ in range(100):  # log lines (health warnings) may come first
            line = await asyncio.to_thread(proc.stdout.readline)
            seen.append(line)
            if line.startswith("ready on ") or not line:
                break
        assert line.startswith("ready on "), seen
        address = line.split()[-1]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            in_flight = [asyncio.ensure_future(code_of(stub.Search(_request(), timeout=30)))
                         for _ in range(5)]  # fmt: skip
            await asyncio.sleep(SLOW_S / 3)  # they are inside the slow shards now
            assert not any(t.done() for t in in_flight)
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            refused = None
            for _ in range(50):
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        refused = await code_of(stub.Search(_request(), timeout=5))
                        break
                except grpc.aio.AioRpcError:
                    refused = await code_of(stub.Search(_request(), timeout=5))
                    break
                await asyncio.sleep(0.02)
            assert refused == grpc.StatusCode.UNAVAILABLE
            assert await asyncio.gather(*in_flight) == [grpc.StatusCode.OK] * 5
        rc = await asyncio.to_thread(proc.wait, 30)
        output = proc.stdout.read()
        assert rc == 0, output
        assert "drained" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_drain_waits_for_in_flight_calls_within_grace() -> None:
    from gateway.server import drain

    async with gateway(shards=[SlowShard(0, 0.5)]) as (port, health):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            call = asyncio.ensure_future(code_of(stub.Search(_request(), timeout=30)))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await drain(health.server, health, grace_s=10)
            assert await call == grpc.StatusCode.OK
            assert time.monotonic() - started < 10


@pytest.mark.integration
@pytest.mark.slow
def test_clipsearch_serve_drains_in_flight_encodes_on_sigterm(tmp_path: Path) -> None:
    """The real `clipsearch serve`: calls in flight at SIGTERM complete, later ones are
    refused, the process exits 0."""
    import re
    import threading

    from clipsearch.v1 import encoder_pb2, encoder_pb2_grpc

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CLIPSEARCH_DATA_DIR": str(tmp_path),
        "CLIPSEARCH_GATEWAY__GRACE_S": "120",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch.cli", "serve", "--port", "0", "--demo-corpus", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        address = None
        deadline = time.monotonic() + 300
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            match = re.search(r"ready on (\S+)", line)
            address = match.group(1) if match else None
        assert address, "server never became ready"
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
        with grpc.insecure_channel(address) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)
            # texts new to the encoder's cache, so every call is real work still in flight
            texts = [f"a scene number {i} with many small red and blue shapes" for i in range(64)]
            futures = [
                stub.EncodeText.future(
                    encoder_pb2.EncodeTextRequest(texts=[f"{t}, call {n}" for t in texts]),
                    timeout=240,
                )
                for n in range(64)
            ]
            time.sleep(0.5)
            assert sum(f.done() for f in futures) < len(futures), "nothing left in flight"
            proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(400):  # health turns NOT_SERVING as draining starts
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                except grpc.RpcError:
                    break
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as err:
                stub.EncodeText(encoder_pb2.EncodeTextRequest(texts=["x"]), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            for f in futures:
                assert len(f.result().embeddings) == len(texts)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
