"""Deep health: grpc.health.v1 statuses backed by real checks, refreshed in the background.

Every `interval_s` the checker sends a canary text through the encoder's batch loop (a new
text each time, so no cache answers for it) and a canary search to every shard, each bounded
by `timeout_s`. Statuses:

- EncoderService: SERVING when the canary encode answered in time.
- SearchService and AdminService: SERVING when the encoder and every shard answered.
- "" (overall): SERVING when all of the above are.

Hysteresis: one failed canary flips nothing. A check re-probes a failing part (the encoder,
or one shard) at once, each try taking at least `timeout_s`, and counts it down only when
`failures` tries in a row failed; the first try that answers counts it up. So one slow canary
on a busy machine leaves health SERVING, while a stuck encoder loop or a dead shard turns it
NOT_SERVING within about `interval_s + failures * timeout_s`.

While draining everything is NOT_SERVING at once and stays so.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from clipsearch.types import Modality
from gateway.coordinator import Coordinator
from gateway.metrics import GatewayMetrics

log = logging.getLogger("clipsearch.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthChecker:
    """Owns the health servicer's statuses: background checks, then drain."""

    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        coordinator: Coordinator,
        services: dict[str, str],
        interval_s: float,
        timeout_s: float,
        metrics: GatewayMetrics | None = None,
        failures: int = 1,
    ) -> None:
        """`services` maps full service names to what they need: "encoder" or "all";
        `failures` is how many failed canaries in a row count a part down."""
        self.servicer = servicer
        self._coord = coordinator
        self._services = services
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failures = max(1, failures)
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._canary = itertools.count()
        self.draining = False
        self.last: dict[str, bool] = {}
        self.on_drain: list[Any] = []
        self.observability: Any = None  # set by create_server: metrics and their port
        self.server: Any = None  # set by create_server: the grpc.aio server
        self.admission: Any = None  # set by create_server: the per-class in-flight bounds
        self.health_server: Any = None  # the plaintext health-only server, when configured
        self.health_port: int | None = None

    async def check_once(self) -> dict[str, bool]:
        """Run the canaries now and publish the statuses; returns {service: serving}."""
        encoder_ok, shards_ok = await asyncio.gather(
            self._confirmed(self._encoder_ok), self._shards_ok()
        )
        needs = {"encoder": encoder_ok, "all": encoder_ok and shards_ok}
        status = {name: needs[need] for name, need in self._services.items()}
        status[""] = encoder_ok and shards_ok
        if not self.draining:
            for name, ok in status.items():
                await self.servicer.set(name, SERVING if ok else NOT_SERVING)
                if self._metrics is not None:
                    self._metrics.healthy.labels(name or "overall").set(1.0 if ok else 0.0)
        if status != self.last:
            log.info("health: %s", {k or "overall": v for k, v in status.items()})
        self.last = status
        return status

    async def _confirmed(self, probe: Callable[[], Awaitable[bool]]) -> bool:
        """True at the first of up to `failures` tries of `probe` that succeeds.

        A try that fails fast (an error rather than a timeout) still takes `timeout_s` before
        the next, so a part gets the same time to recover either way."""
        for attempt in range(1, self._failures + 1):
            start = time.monotonic()
            if await probe():
                return True
            if self.draining:  # statuses are final now: no point in trying again
                return False
            if attempt < self._failures:
                await asyncio.sleep(max(0.0, self._timeout_s - (time.monotonic() - start)))
        return False

    async def _encoder_ok(self) -> bool:
        start = time.perf_counter()
        text = f"health canary {next(self._canary)} {time.time_ns()}"
        try:
            vecs = await asyncio.wait_for(self._coord.encoder.encode_texts([text]), self._timeout_s)
            ok = vecs.shape == (1, self._coord.encoder.dim) and bool(np.isfinite(vecs).all())
        except Exception as exc:  # any failure, timeout included, means not serving
            log.warning("health: encoder canary failed: %s", type(exc).__name__)
            ok = False
        if self._metrics is not None:
            self._metrics.encoder_probe_seconds.set(time.perf_counter() - start)
            try:
                self._metrics.observe_encoder_stats(
                    await asyncio.wait_for(self._coord.encoder.stats(), self._timeout_s)
                )
                await asyncio.wait_for(
                    self._metrics.observe_encoder_queues(self._coord.encoder), self._timeout_s
                )
            except Exception:
                pass  # figures only; health does not depend on them
        return ok

    async def _shards_ok(self) -> bool:
        results = await asyncio.gather(
            *(
                self._confirmed(functools.partial(self._shard_ok, n, s))
                for n, s in enumerate(self._coord.shards)
            )
        )
        return all(results)

    async def _shard_ok(self, number: int, shard: Any) -> bool:
        query = np.zeros(self._coord.encoder.dim, dtype=np.float32)
        query[0] = 1.0
        start = time.perf_counter()
        try:
            await asyncio.wait_for(shard.search(Modality.IMAGE, query, 1, None), self._timeout_s)
            if self._metrics is not None:
                self._metrics.shard_probe_seconds.labels(str(number)).set(
                    time.perf_counter() - start
                )
                stats = await asyncio.wait_for(shard.stats(), self._timeout_s)
                self._metrics.observe_shard_stats(stats)
            return True
        except Exception as exc:
            log.warning("health: shard %d canary failed: %s", number, type(exc).__name__)
            return False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="health-checks")

    async def _loop(self) -> None:
        while not self.draining:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_once()
            except Exception:  # keep checking; a bug here must not freeze the last status
                log.exception("health check failed")

    async def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING for good; stop the checks; run the drain callbacks."""
        if self.draining:
            return
        self.draining = True
        for callback in self.on_drain:
            callback()
        await self.servicer.enter_graceful_shutdown()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def set(self, service: str, status: Any) -> None:
        await self.servicer.set(service, status)
