"""The local launcher: composes a Ray runtime, the encoder deployment, the shard actors and
the gateway into one running stack (what `clipsearch serve` runs)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from clipsearch.settings import Settings

log = logging.getLogger("clipsearch.launcher")

ENCODER_APP = "clipsearch-encoder"
SHARD_PREFIX = "clipsearch-shard"


@dataclass
class Stack:
    """A running clipsearch: the gateway plus the Ray handles behind it."""

    settings: Settings
    port: int
    server: Any
    health: Any
    coordinator: Any
    shard_actors: list[Any]

    @property
    def address(self) -> str:
        """host:port clients connect to."""
        return f"{self.settings.gateway.host}:{self.port}"

    async def stop(self) -> None:
        """Drain the gateway, then remove the encoder app and the shard actors (embedded only)."""
        import ray
        from ray import serve

        from gateway.server import drain

        await drain(self.server, self.health, self.settings.gateway.grace_s)
        if self.settings.ray_address != "local":
            return  # on a shared cluster the encoder and shards serve the other gateways too
        await asyncio.to_thread(serve.delete, ENCODER_APP)
        for actor in self.shard_actors:
            ray.kill(actor)


def init_ray(settings: Settings) -> str | None:
    """Start an embedded Ray runtime (no dashboard) unless one is already running.

    Returns Ray's temp directory when this call started Ray (the caller removes it after
    `ray.shutdown()`), else None.
    """
    # Serve's router asks replicas for their queue length with a 0.1 s deadline and warns on
    # every miss; on a busy 2-core machine that floods the log while the demo corpus loads.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    import ray

    if ray.is_initialized():
        return None
    if settings.ray_address != "local":
        # Detached by default: the shard actors this gateway may create outlive it.
        ray.init(
            address=settings.ray_address,
            namespace="clipsearch",
            job_config=ray.job_config.JobConfig(default_actor_lifetime="detached"),
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        return None
    temp_dir = tempfile.mkdtemp(prefix="csray-", dir="/tmp")  # short: unix socket path limit
    ray.init(
        include_dashboard=False,
        address="local",
        namespace="clipsearch",
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
        log_to_driver=False,
        # Ray starts workers at niceness 15, below the gateway and its own daemons. Here the
        # workers are the server (encoder replica, shard actors): at 15 every nice-0 process
        # preempts them mid-search or mid-forward. (A cluster sets RAY_worker_niceness=0.)
        _system_config={"worker_niceness": 0},
    )
    return temp_dir


async def start_stack(settings: Settings) -> Stack:
    """Start encoder, shards and gateway on the current Ray runtime; load the demo corpus."""
    from ray import serve

    from encoder_service.deployment import build_encoder_app
    from gateway.backends import RayEncoder, RayShard
    from gateway.coordinator import Coordinator
    from gateway.server import create_server
    from index_service.actor import start_shards

    serve.start(proxy_location="Disabled")
    shared = settings.ray_address != "local"
    handle: Any = _running_encoder() if shared else None
    if handle is None:
        app = build_encoder_app(settings.encoder, settings.limits)
        handle = await asyncio.to_thread(serve.run, app, name=ENCODER_APP, route_prefix=None)
    info = await handle.info.remote()
    actors: Any = _named_shards(settings.index.shards) if shared else None
    actors = actors or await asyncio.to_thread(
        start_shards,
        settings.index,
        info["dim"],
        str(settings.data_dir.resolve()),
        info["model_id"],
        SHARD_PREFIX,
    )
    shards = [RayShard(a, i) for i, a in enumerate(actors)]
    await asyncio.gather(*(s.connect() for s in shards))
    # Calls past what the replicas batch at once are coalesced (see RayEncoder).
    batchable = 2 * settings.encoder.max_batch_size * settings.encoder.replicas
    encoder = RayEncoder(handle, info["model_id"], info["dim"], batchable)
    await encoder.connect()  # the replicas' direct channels, open before the first call
    coordinator = Coordinator(encoder, shards)
    server, port, health = await create_server(coordinator, settings)
    stack = Stack(settings, port, server, health, coordinator, actors)
    stored = sum(s.documents for s in await coordinator.stats())
    if settings.demo_corpus and stored == 0:
        await load_demo_corpus(stack, settings.demo_corpus)
    return stack


def _running_encoder() -> Any:
    """The encoder app another gateway deployed on this cluster, or None."""
    from ray import serve

    try:
        return serve.get_app_handle(ENCODER_APP)
    except Exception:  # Serve raises its own exception type when there is no such app
        return None


def _named_shards(n: int) -> list[Any] | None:
    """Handles of the `n` shard actors another gateway started, or None if any is missing."""
    import ray

    try:
        return [ray.get_actor(f"{SHARD_PREFIX}-{i}") for i in range(n)]
    except ValueError:
        return None


async def load_demo_corpus(stack: Stack, n: int, batch: int = 64) -> int:
    """Write `n` generated demo documents through the normal validation and write path."""
    from clipsearch.client import to_upsert_document
    from clipsearch.demo.corpus import demo_documents
    from clipsearch.v1 import search_pb2
    from gateway.convert import Validator

    validator = Validator(stack.settings.limits, stack.coordinator.encoder.dim)
    docs = list(demo_documents(n, now=time.time()))
    for start in range(0, len(docs), batch):
        req = search_pb2.UpsertRequest(
            documents=[to_upsert_document(d) for d in docs[start : start + batch]]
        )
        await stack.coordinator.upsert(validator.upsert_items(req, now=time.time()))
    log.info("loaded %d demo documents", len(docs))
    return len(docs)
