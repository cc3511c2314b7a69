"""What the gateway needs from the encoder and the shards, and the Ray implementations.

The coordinator only sees these protocols, so tests can run it over in-process engines and
the server over Ray handles without either knowing model or Faiss code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import ray
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from clipsearch.aio import settle
from clipsearch.errors import ClipsearchError, InvalidArgument, ResourceExhausted, Unavailable
from clipsearch.types import (
    DocRecord,
    DocWrite,
    EncoderStats,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
    ShardStats,
    TextOptions,
)
from encoder_service.channel import pack_text
from encoder_service.channel_pool import ChannelPool
from gateway.coalesce import Coalescer
from index_service import wire
from index_service.channel import ChannelClient

T = TypeVar("T")
log = logging.getLogger("clipsearch.gateway")


class EncoderBackend(Protocol):
    """Turns raw inputs into L2-normalised float32 vectors."""

    model_id: str
    dim: int

    async def encode_texts(
        self, texts: Sequence[str], options: TextOptions | None = None
    ) -> np.ndarray: ...

    async def encode_images(self, images: Sequence[bytes]) -> np.ndarray: ...

    async def stats(self) -> EncoderStats: ...


class ShardBackend(Protocol):
    """One shard, reached asynchronously."""

    def search(
        self,
        modality: Modality,
        query: np.ndarray,
        k: int,
        flt: SearchFilter | None,
        params: SearchParams | None = None,
        deadline: float | None = None,
    ) -> Awaitable[ShardHits]:
        """The shard's hits. Best a future of a search already sent: the coordinator starts
        every shard's search and then awaits them, and only a coroutine needs a task for
        that (an `async def` works, at that cost)."""
        ...

    async def upsert(self, writes: Sequence[DocWrite]) -> int: ...

    async def delete(self, doc_ids: Sequence[str]) -> int: ...

    async def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]: ...

    async def stats(self) -> ShardStats: ...


async def call_remote(awaitable: Awaitable[T], what: str) -> T:
    """Await a Ray call, turning Ray's failures into domain errors.

    A domain error raised remotely arrives wrapped in RayTaskError, which Ray makes an
    instance of the original class as well; its `cause` is the original exception.
    """
    try:
        return await awaitable
    except asyncio.CancelledError:
        cancel_remote(awaitable)  # the caller's deadline passed or it went away
        raise
    except ray_errors.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if isinstance(cause, ClipsearchError):
            raise type(cause)(str(cause)) from exc
        raise
    except serve_errors.BackPressureError as exc:
        raise ResourceExhausted(f"{what} is overloaded; retry with backoff") from exc
    except (
        ray_errors.RayActorError,
        ray_errors.ActorUnavailableError,
        serve_errors.DeploymentUnavailableError,
    ) as exc:
        raise Unavailable(f"{what} is unavailable; retry shortly") from exc


def cancel_remote(awaitable: object) -> None:
    """Cancel the remote work behind an awaitable: `ray.cancel` for an ObjectRef (an actor
    task: dropped if queued, interrupted if it is a coroutine), `.cancel()` for a Serve
    DeploymentResponse. Best effort: the work may have finished already."""
    try:
        if isinstance(awaitable, ray.ObjectRef):
            ray.cancel(awaitable)
        elif callable(cancel := getattr(awaitable, "cancel", None)):
            cancel()
    except Exception:  # cancelling is advice; never turn it into the caller's error
        log.debug("cancelling remote work failed", exc_info=True)


class RayEncoder:
    """The encoder Serve deployment, one item per request so its batcher can group items
    from many callers.

    Items go over a replica's direct channel (encoder_service.channel: a Unix socket into
    the replica's own batch queues, ~0.1 ms against ~6 ms for a Serve handle call) when one
    on this node is open, to the one with the fewest items out; else, and for every item a
    channel dropped mid-call (a replica killed or restarted: encoding is idempotent), through
    the DeploymentHandle. The channels open in the background on the first calls (or at
    `connect`) and follow the replica set as it changes.

    Past `max_in_flight` calls out per input kind (set it to what the replicas can batch at
    once: 2 x max_batch_size per replica), items wait and then travel together in one
    `encode_many` call (gateway.coalesce): an overloaded gateway then spends its CPU on a
    few calls instead of one per item. Below it every item goes at once on its own. A lower
    limit is worse, measured: with 2, an item arriving to a free slot went alone while the
    others waited at the gateway, so the replica ran batches of 1 (served image throughput
    0.95 -> 0.66 of raw).
    """

    def __init__(self, handle: Any, model_id: str, dim: int, max_in_flight: int = 16) -> None:
        self._handle = handle
        self.model_id = model_id
        self.dim = dim
        self.texts: Coalescer[tuple[str, TextOptions | None], np.ndarray] = Coalescer(
            partial(self._one, "text"), partial(self._many, "text"), max_in_flight
        )
        self.images: Coalescer[bytes, np.ndarray] = Coalescer(
            partial(self._one, "image"), partial(self._many, "image"), max_in_flight
        )
        self.channels = ChannelPool(self._channel_addresses, "the encoder")
        self.use_channel = True  # False: handle calls only (the benchmark's baseline)
        self.channel_calls = 0  # calls sent over a channel (observability, tests)

    async def encode_texts(
        self, texts: Sequence[str], options: TextOptions | None = None
    ) -> np.ndarray:
        return await self._gather([self.texts.call((t, options)) for t in texts], "texts")

    async def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        return await self._gather([self.images.call(b) for b in images], "images")

    async def stats(self) -> EncoderStats:
        return await call_remote(self._handle.stats.remote(), "the encoder")

    async def connect(self) -> bool:
        """Open the replicas' direct channels now (else the first calls open them in the
        background); True if calls will use one."""
        try:
            return await self.channels.refresh() > 0
        except (ClipsearchError, OSError):
            log.warning("the encoder: direct channels not opened; using the Serve handle")
            return False

    async def _channel_addresses(self) -> list[str]:
        """The replicas' channel addresses on this node (others are out of reach)."""
        found = await call_remote(self._handle.channel_addresses.remote(), "the encoder")
        here = ray.get_runtime_context().get_node_id()
        return [address for node, address in found if node == here]

    async def _one(self, kind: str, item: Any) -> np.ndarray:
        answers = await self._over_channel(kind, [item])
        if answers is not None:
            if isinstance(answers[0], BaseException):
                raise answers[0]
            return answers[0]
        if kind == "text":
            return await call_remote(self._handle.encode_text.remote(*item), "the encoder")
        return await call_remote(self._handle.encode_image.remote(item), "the encoder")

    async def _many(self, kind: str, items: list[Any]) -> list[np.ndarray | BaseException]:
        answers = await self._over_channel(kind, items)
        if answers is not None:
            return answers
        return list(await call_remote(self._handle.encode_many.remote(kind, items), "the encoder"))

    async def _over_channel(
        self, kind: str, items: list[Any]
    ) -> list[np.ndarray | BaseException] | None:
        """The items' answers from the least-loaded replica channel; None when none is open
        or it broke under them (the caller then uses the handle)."""
        channel = self.channels.pick() if self.use_channel else None
        if channel is None:
            return None
        self.channel_calls += 1
        sent = [pack_text(*item) for item in items] if kind == "text" else items
        try:
            return await channel.call(kind, sent)
        except Unavailable:
            self.channels.broken()
            return None

    async def _gather(self, calls: list[Awaitable[np.ndarray]], field: str) -> np.ndarray:
        """Await per-item calls; an item's InvalidArgument names its index when there are
        several (`texts[3]: ...`)."""
        results = await settle(calls)
        for index, result in enumerate(results):
            if isinstance(result, InvalidArgument) and len(calls) > 1:
                raise InvalidArgument(f"{field}[{index}]: {result}") from result
            if isinstance(result, BaseException):
                raise result
        return self._stack(results)  # type: ignore[arg-type]

    def _stack(self, vectors: list[np.ndarray]) -> np.ndarray:
        if not vectors:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)


class RayShard:
    """A `ShardActor` behind its ActorHandle. Searches go over the shard's direct channel
    when it runs on this node (see index_service.channel), else as actor calls; concurrent
    searches share calls either way (see gateway.coalesce)."""

    RECONNECT_S = 1.0  # least time between attempts to (re)open the search channel
    RECHECK_S = 60.0  # ... and between asking a shard without one (other node, turned off)

    def __init__(self, actor: Any, shard_id: int) -> None:
        self._actor = actor
        self._what = f"shard {shard_id}"
        self.searches: Coalescer[wire.SearchRequest, ShardHits] = Coalescer(
            self._search_one, self._search_many
        )
        self._channel: ChannelClient | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._next_attempt = 0.0
        self.channel_calls = 0  # calls that went over the channel (observability, tests)
        self.use_channel = True  # False: actor calls only (the benchmark's baseline)

    def search(
        self,
        modality: Modality,
        query: np.ndarray,
        k: int,
        flt: SearchFilter | None,
        params: SearchParams | None = None,
        deadline: float | None = None,
    ) -> asyncio.Future[ShardHits]:
        """Sends the search now (or queues it to go with others); over the channel its
        answer arrives without a task (see `ShardBackend.search`)."""
        request = wire.pack_request(modality, query, k, flt, params, deadline)
        return self.searches.start(request)

    @property
    def channel_open(self) -> bool:
        """Whether searches go over the direct channel now."""
        return self.use_channel and self._channel is not None and not self._channel.closed

    async def connect(self) -> bool:
        """Open the search channel now (else the first searches open it in the background);
        True if searches will use it."""
        if self._channel is None or self._channel.closed:
            self._next_attempt = time.monotonic() + self.RECONNECT_S
            try:
                await self._open_channel()
            except (ClipsearchError, OSError):
                log.warning("%s: search channel not opened; using actor calls", self._what)
        return self._channel is not None and not self._channel.closed

    def _search_one(self, request: wire.SearchRequest) -> Awaitable[ShardHits]:
        channel = self._usable_channel()
        if channel is None:
            return self._actor_search(request)
        self.channel_calls += 1
        return channel.send([request], _only_hits)

    def _search_many(
        self, requests: list[wire.SearchRequest]
    ) -> Awaitable[list[ShardHits | BaseException]]:
        channel = self._usable_channel()
        if channel is None:
            return self._actor_search_many(requests)
        self.channel_calls += 1
        return channel.send(requests, _all_hits)

    async def _actor_search(self, request: wire.SearchRequest) -> ShardHits:
        return wire.unpack_hits(
            await call_remote(self._actor.search_packed.remote(request), self._what)
        )

    async def _actor_search_many(
        self, requests: list[wire.SearchRequest]
    ) -> list[ShardHits | BaseException]:
        answers = await call_remote(self._actor.search_many.remote(requests), self._what)
        return _all_hits(answers)

    def _usable_channel(self) -> ChannelClient | None:
        """The open channel, or None (then start opening one, at most once a second)."""
        channel = self._channel
        if channel is not None and not channel.closed:
            return channel if self.use_channel else None
        now = time.monotonic()
        if self._connecting is None and now >= self._next_attempt:
            self._next_attempt = now + self.RECONNECT_S
            self._connecting = asyncio.ensure_future(self._open_channel())
            self._connecting.add_done_callback(self._opened)
        return None

    def _opened(self, task: asyncio.Task[None]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s: search channel not opened", self._what, exc_info=task.exception())

    async def _open_channel(self) -> None:
        address = await call_remote(self._actor.search_channel.remote(), self._what)
        if address is None or address[0] != ray.get_runtime_context().get_node_id():
            # Off, or the shard runs on another node: actor calls. Ask again now and then
            # (a restarted actor may land here), not once a second.
            self._channel = None
            self._next_attempt = time.monotonic() + self.RECHECK_S
            return
        old, self._channel = self._channel, await ChannelClient.connect(address[1], self._what)
        if old is not None:
            old.close()

    async def upsert(self, writes: Sequence[DocWrite]) -> int:
        return await call_remote(self._actor.upsert.remote(list(writes)), self._what)

    async def delete(self, doc_ids: Sequence[str]) -> int:
        return await call_remote(self._actor.delete.remote(list(doc_ids)), self._what)

    async def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        return await call_remote(self._actor.get.remote(list(doc_ids)), self._what)

    async def stats(self) -> ShardStats:
        return await call_remote(self._actor.stats.remote(), self._what)


def _only_hits(answers: list[wire.SearchReply | BaseException]) -> ShardHits:
    """A lone search's hits, or its error raised."""
    (answer,) = answers
    if isinstance(answer, BaseException):
        raise answer
    return wire.unpack_hits(answer)


def _all_hits(
    answers: Sequence[wire.SearchReply | BaseException],
) -> list[ShardHits | BaseException]:
    """A batch's hits, an item's error in its place."""
    return [a if isinstance(a, BaseException) else wire.unpack_hits(a) for a in answers]
