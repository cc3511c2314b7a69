"""The encoder as a Ray Serve deployment: validated single items in, dynamic batches to the model.

Request path of one image: bytes → content hash and cache lookup, then decode + preprocess,
in a bounded worker pool (a bad image fails here, alone) → image queue of the `Batcher`,
which takes a batch when the model is free → one model forward per batch in the model
thread → one normalised vector back (and into the cache). Texts are templated, tokenised
(into windows when long) and looked up in the cache before they join their own queue.

Errors: an `InvalidArgument` raised here reaches a DeploymentHandle caller as a
`RayTaskError(InvalidArgument)`, which is an instance of `InvalidArgument` (so `except
InvalidArgument` works) but whose `str()` is Ray's dump (actor name, pid, stack, paths).
Show callers `str(exc.cause)`: `.cause` is the original exception.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import ray
import torch
from ray import serve
from ray.serve import Application

from clipsearch.aio import settle
from clipsearch.errors import InvalidArgument
from clipsearch.settings import EncoderSettings, LimitSettings
from clipsearch.types import EncoderStats, TextOptions
from encoder_service import channel
from encoder_service.batching import Batcher
from encoder_service.cache import EmbeddingCache, content_key
from encoder_service.images import decode_image
from encoder_service.model import ClipEncoder, ImageInput
from encoder_service.phases import PhaseLog, PhaseTimes
from encoder_service.replica_stats import ReplicaCounters, StatsReporter
from encoder_service.text import apply_template, check_template

DECODE_WORKERS = 2
"""Images decoded and preprocessed at once per replica (bounds CPU and memory spikes)."""
FORWARD_STUCK_AFTER_S = 120.0
"""A model forward running longer than this makes the replica report itself unhealthy."""


def replica_env(encoder: EncoderSettings) -> dict[str, str]:
    """The environment a replica's process starts with: libgomp's wait policy.

    libgomp reads it once, at start-up. Its default (spin ~3 ms, then sleep; throttled to
    ~100 rounds once the process holds more OpenMP threads than cores, as a replica with two
    model slots does) and PASSIVE (sleep at once) were measured earlier; PASSIVE was kept,
    because on 2 shared cores spinning threads starved each other (0.5 vs 5.2 img/s under
    load) and the default spin cost 4-11 % of images/s. But a sleeping worker is woken at
    every parallel region of a lone forward: an fp32 ViT-B/32 image forward with 2 threads,
    in a plain process, took 74-76 ms passive against 65-68 ms with the default spin.

    ACTIVE with a bounded `GOMP_SPINCOUNT` takes most of that back: 1,000-3,000 rounds (tens
    of microseconds) measured 65-69 ms, and ACTIVE makes the throttled count min(1000, N)
    instead of ~100, so the replica spins too. Under load it costs nothing measurable:
    concurrent batches run one thread each, with no team to wait for (bench/encoder.py,
    alternated with PASSIVE: image throughput 0.93-1.03 of raw vs 0.94-0.95). Its price is
    on a host whose cores other processes keep busy: with a busy loop on one of the 2 cores,
    a lone 2-thread forward took 165-172 ms against 126 ms passive (241-251 ms with the
    default spin). `encoder.omp_spin_count: 0` is PASSIVE for such hosts.
    """
    if encoder.omp_spin_count == 0:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": str(encoder.omp_spin_count)}


_BATCH_KEYS = frozenset({"max_batch_size", "batch_wait_timeout_s"})
REPLICA_NICENESS = 0
"""Scheduling niceness the replica's threads ask for. Ray starts every worker process at
niceness 15 (its `worker_niceness` default), so on a shared CPU any nice-0 process (the
gateway, Ray's own daemons, a neighbour) preempts the model's OpenMP threads, and one
descheduled thread stalls a whole forward at the next barrier: a batch-1 ViT-B/32 image
forward measured 107-138 ms in the replica vs 86-95 ms in-process."""

log = logging.getLogger(__name__)

T = TypeVar("T")
_Ran = tuple[np.ndarray, float, float, int]
"""One item's batch result: its vector, the forward's start and end (perf_counter), batch size."""


def raise_thread_priority(niceness: int = REPLICA_NICENESS) -> bool:
    """Set every thread of this process (and so the threads they start later, which inherit
    it) to `niceness` if that is lower than now; False, with a warning, where the process may
    not lower its niceness (no CAP_SYS_NICE: then the replica runs as Ray started it)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [threading.get_native_id()]
    ok = True
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except ProcessLookupError:  # the thread has exited meanwhile
            continue
        except OSError:
            ok = False
    if not ok:
        log.warning(
            "encoder replica: could not lower its niceness to %d (needs CAP_SYS_NICE); "
            "forwards may stall while other processes use the CPU",
            niceness,
        )
    return ok


def _raise_own_priority() -> None:
    """Pool initializer: the worker thread (and the OpenMP team it starts) at full priority."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > REPLICA_NICENESS:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), REPLICA_NICENESS)
    except OSError:
        pass


def cache_namespace(encoder: ClipEncoder) -> str:
    """Everything about the encoder that changes a vector (model, dtype, resolutions,
    pre-shrink); part of every cache key."""
    scales = ",".join(map(str, encoder.scales))
    return f"{encoder.model_id}|{encoder.dtype}|{scales}|gap={encoder.reducing_gap:g}"


def default_torch_threads(replicas: int) -> int:
    """Intra-op threads when settings say 0: this machine's cores shared among the replicas.

    Not torch's own default: inside a Ray worker that follows OMP_NUM_THREADS, which Ray sets
    to the replica's `num_cpus` (1 by default), so every forward would run on one core.
    """
    return max(1, len(os.sched_getaffinity(0)) // max(1, replicas))


def batch_config(encoder: EncoderSettings) -> dict[str, Any]:
    """The Serve `user_config` that carries the run-time batch limits."""
    return {
        "max_batch_size": encoder.max_batch_size,
        "batch_wait_timeout_s": encoder.batch_wait_timeout_s,
    }


def build_encoder_app(encoder: EncoderSettings, limits: LimitSettings) -> Application:
    """Bind the encoder deployment with its Serve options taken from settings.

    Args:
        encoder: Model, device, batching, replica and resource settings.
        limits: Request limits (text bytes, image bytes and pixels) re-checked per item.

    Returns:
        An application for `serve.run(app, name=..., route_prefix=None)`.

    Raises:
        ValueError: `max_ongoing_requests` is below `max_batch_size`, so batches could
            never fill.
    """
    if encoder.max_ongoing_requests < encoder.max_batch_size:
        raise ValueError(
            f"encoder.max_ongoing_requests ({encoder.max_ongoing_requests}) must be >= "
            f"encoder.max_batch_size ({encoder.max_batch_size}): a replica never holds "
            "more requests than that, so larger batches could never form"
        )
    # mypy does not see that @serve.deployment turned the class into a Deployment.
    deployment = EncoderDeployment.options(  # type: ignore[attr-defined]
        num_replicas=encoder.replicas,
        max_ongoing_requests=encoder.max_ongoing_requests,
        max_queued_requests=encoder.max_queued_requests,
        ray_actor_options={
            "num_cpus": encoder.num_cpus,
            "num_gpus": encoder.num_gpus,
            "runtime_env": {"env_vars": replica_env(encoder)},
        },
        user_config=batch_config(encoder),
        # The gateway writes one access-log line per RPC; a second line per item from every
        # replica (formatted, written, shipped to the driver) costs CPU the model needs.
        logging_config={"enable_access_log": False},
    )
    return deployment.bind(encoder, limits)


@serve.deployment
class EncoderDeployment:
    """One encoder replica: separate batch queues for text and images over one model.

    The two queues share one `Batcher`, which hands the model its next batch only when the
    previous one is done (see encoder_service/batching.py for why not `@serve.batch`).
    """

    def __init__(self, encoder: EncoderSettings, limits: LimitSettings) -> None:
        """Load the model and set the initial batch limits from settings."""
        self._limits = limits
        self._settings = encoder
        raise_thread_priority()
        check_template(encoder.prompt_template)
        self._encoder = ClipEncoder(
            encoder.model,
            device=encoder.device,
            dtype=encoder.dtype,
            torch_threads=encoder.torch_threads or default_torch_threads(encoder.replicas),
            multiscale_sizes=encoder.multiscale_sizes,
            reducing_gap=encoder.reducing_gap,
        )
        self._cache = EmbeddingCache(encoder.cache_bytes)
        self._model_key = cache_namespace(self._encoder)
        self._decode_pool = ThreadPoolExecutor(
            DECODE_WORKERS, thread_name_prefix="decode", initializer=_raise_own_priority
        )
        # torch's intra-op thread count is an OpenMP setting of the calling thread, and Ray
        # starts replicas with OMP_NUM_THREADS=num_cpus: the count set while loading does not
        # reach a new thread, which would run every forward on one core. Each forward sets
        # its own count (see _timed).
        self._threads = torch.get_num_threads()
        concurrent = encoder.concurrent_batches or (
            1 if self._encoder.device != "cpu" else min(2, self._threads)
        )
        # One single-thread executor per concurrent slot, and a batch takes the lowest free
        # slot: at low load every forward runs on the same thread, whose OpenMP team is then
        # the one already awake and warm (a shared pool would alternate between teams).
        self._model_slots = [
            ThreadPoolExecutor(1, thread_name_prefix=f"model{n}", initializer=_raise_own_priority)
            for n in range(concurrent)
        ]
        self._free_slots = list(range(concurrent))
        self._active_forwards = 0
        self._active_lock = threading.Lock()
        self._batcher = Batcher(
            self._run_batch,
            ("text", "image"),
            encoder.max_batch_size,
            encoder.batch_wait_timeout_s,
            max_concurrent=concurrent,
        )
        # model thread -> its forward's queue and start (time.monotonic)
        self._forward_starts: dict[int, tuple[str, float]] = {}
        self._forward_seconds: dict[str, float] = {"text": 0.0, "image": 0.0}
        self._phases = PhaseLog(("text", "image"))
        # One replica's counters are the total: no board actor (a worker process) then.
        self._reporter = StatsReporter(self._own_counters) if encoder.replicas > 1 else None
        self._apply_batch_limits(encoder.max_batch_size, encoder.batch_wait_timeout_s)
        self._channel, self._channel_start = self._open_channel()

    async def encode_text(self, text: str, options: TextOptions | None = None) -> np.ndarray:
        """Embed one text (joins the text batch queue unless cached).

        Args:
            text: The text, before the prompt template is applied.
            options: Template and long-text strategy; None fields use the settings.

        Returns:
            A (dim,) float32 unit vector.

        Raises:
            InvalidArgument: The text is not a string, empty/whitespace, or over the limit;
                the template lacks exactly one "{}"; or the text is too long under `reject`.
        """
        start = time.perf_counter()
        _check_text(text, self._limits.max_text_bytes)
        template, long_text = self._text_options(options)
        templated = apply_template(template, text)
        stride = self._settings.sliding_window_stride
        key = content_key(self._model_key, "text", long_text, str(stride), templated)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # Tokenising one bounded text takes well under a millisecond: cheaper inline than
        # a hop through a worker thread.
        rows = self._encoder.prepare_text(templated, long_text, stride)
        vector = await self._embed("text", rows, start)
        self._cache.put(key, vector)
        return vector

    async def encode_image(self, data: bytes) -> np.ndarray:
        """Embed one encoded image: decoded and preprocessed first, then batched.

        Returns:
            A (dim,) float32 unit vector.

        Raises:
            InvalidArgument: The bytes are not an acceptable image (see `decode_image`).
        """
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        # Hashing and decoding before the queue, in workers: a bad image fails alone, and
        # the model thread only ever sees ready pixels.
        key, found = await loop.run_in_executor(self._decode_pool, self._lookup_image, data)
        if isinstance(found, np.ndarray):
            return found
        vector = await self._embed("image", found, start)
        self._cache.put(key, vector)
        return vector

    async def encode_many(
        self, kind: str, items: Sequence[Any]
    ) -> list[np.ndarray | BaseException]:
        """Several items in one call (the gateway coalesces concurrent single-item calls):
        `kind` "text" takes (text, options) pairs as `encode_text` does, "image" takes
        encoded images as `encode_image` does. Each item joins its batch queue on its own;
        one that fails answers with its error in its place and the others go on."""
        if kind == "text":
            coros = [self.encode_text(text, options) for text, options in items]
        elif kind == "image":
            coros = [self.encode_image(data) for data in items]
        else:
            raise InvalidArgument(f"unknown input kind {kind!r}; use 'text' or 'image'")
        return list(await settle(coros))

    async def channel_addresses(self) -> list[tuple[str, str]]:
        """(Ray node id, socket address) of the direct channel (encoder_service.channel) of
        every live replica, this one's first; empty when this replica has none."""
        own = self._channel_address()
        if own is None:
            return []
        others = await self._reporter.channels() if self._reporter else []
        return [own, *(c for c in others if c != own)]

    async def channel_stats(self) -> dict[str, int]:
        """Requests and items this replica has taken over its direct channel, items in it
        now (all 0 without one), and its process id."""
        server = self._channel
        counts = (server.requests, server.items_total, server.items) if server else (0, 0, 0)
        return dict(zip(("requests", "items", "in_flight"), counts, strict=True), pid=os.getpid())

    async def info(self) -> dict[str, Any]:
        """What the model is: `{"model_id": str, "dim": int, "max_text_tokens": int}`."""
        return {
            "model_id": self._encoder.model_id,
            "dim": self._encoder.dim,
            "max_text_tokens": self._encoder.max_text_tokens,
        }

    async def stats(self) -> EncoderStats:
        """Model facts, and the batch-size histograms and cache counters summed over the
        replicas (see encoder_service.replica_stats); this replica's own if the sum cannot
        be had."""
        enc = self._encoder
        counters = await self._reporter.merged() if self._reporter else self._own_counters()
        return EncoderStats(
            model_id=enc.model_id,
            dim=enc.dim,
            device=enc.device,
            dtype=enc.dtype,
            context_length=enc.max_text_tokens,
            image_size=enc.image_size,
            replicas=self._settings.replicas,
            batch_sizes=counters.batch_sizes,
            cache=counters.cache,
            forward_seconds=counters.forward_seconds,
            model_slots=counters.model_slots,
        )

    def _own_counters(self) -> ReplicaCounters:
        """This replica's batch histograms, cache counters and forward seconds, and its
        channel's address."""
        cache = self._cache.counters()
        return ReplicaCounters(
            self._batcher.batch_sizes(),
            {
                "hits": cache.hits,
                "misses": cache.misses,
                "entries": cache.entries,
                "bytes": cache.bytes,
                "capacity_bytes": cache.capacity_bytes,
            },
            self._channel_address(),
            forward_seconds=self._busy_seconds(),
            model_slots=len(self._model_slots),
        )

    def _open_channel(self) -> tuple[channel.EncodeChannelServer | None, Any]:
        """The direct channel and the task that starts serving it on this replica's event
        loop (the one its Serve methods run on, so items join the same batch queues); None
        off Linux, or where the constructor runs outside an event loop (not under Serve)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None, None
        if not channel.supported():
            return None, None
        # A replica holds what Serve would let it hold (running + queued) from the channel.
        limit = self._settings.max_ongoing_requests + self._settings.max_queued_requests
        server = channel.EncodeChannelServer(self._channel_items, "encoder", limit)
        return server, loop.create_task(server.start())

    def _channel_address(self) -> tuple[str, str] | None:
        if self._channel is None:
            return None
        return ray.get_runtime_context().get_node_id(), self._channel.address

    async def _channel_items(self, kind: str, items: list[Any]) -> list[np.ndarray | BaseException]:
        """A direct-channel request: as `encode_many`, text options as plain pairs."""
        if kind == "text":
            items = [channel.unpack_text(item) for item in items]
        return await self.encode_many(kind, items)

    async def batch_stats(self) -> dict[str, dict[int, int]]:
        """How many batches of each size each queue has run since the replica started."""
        return self._batcher.batch_sizes()

    async def queue_depths(self) -> dict[str, int]:
        """Requests waiting for the model in each queue (`text`, `image`) right now."""
        return self._batcher.depths()

    async def phase_times(self, queue: str) -> list[PhaseTimes]:
        """Where the latest requests of `queue` ("text" or "image") spent their time here,
        oldest first (see encoder_service.phases)."""
        return self._phases.recent(queue)

    def _busy_seconds(self) -> dict[str, float]:
        """Seconds in forwards per queue, forwards still running counted up to now (in
        `stats`: over a window, their change / (window x slots) is the share of the
        model's capacity used; the rest the slots waited for work)."""
        with self._active_lock:
            seconds = dict(self._forward_seconds)
            now = time.monotonic()
            for queue, started in self._forward_starts.values():
                seconds[queue] += now - started
        return seconds

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply Serve's `user_config`: `max_batch_size` and/or `batch_wait_timeout_s`.

        Raises:
            ValueError: Unknown keys or out-of-range values (the update is then rejected).
            TypeError: A value of the wrong type.
        """
        unknown = set(config) - _BATCH_KEYS
        if unknown:
            raise ValueError(f"unknown encoder user_config keys: {sorted(unknown)}")
        self._apply_batch_limits(
            config.get("max_batch_size", self._max_batch_size),
            config.get("batch_wait_timeout_s", self._batch_wait_timeout_s),
        )

    async def check_health(self) -> None:
        """Serve's periodic probe: fail when a forward hangs or a batch loop has died."""
        if self._reporter is not None:  # every replica reports, asked for stats or not
            self._reporter.start()
        with self._active_lock:  # model threads add and remove entries
            started = min((s for _, s in self._forward_starts.values()), default=None)
        if started is not None and time.monotonic() - started > FORWARD_STUCK_AFTER_S:
            raise RuntimeError(f"model forward running for over {FORWARD_STUCK_AFTER_S:.0f} s")
        if not self._batcher.alive():
            raise RuntimeError("the batch scheduler has stopped")

    async def _embed(self, queue: str, item: Any, start: float) -> np.ndarray:
        """Queue one prepared item for its batch and log where its time went."""
        prepared = time.perf_counter()
        vector, ran_from, ran_to, size = await self._batcher.submit(queue, item)
        times = PhaseTimes(
            prepare_s=prepared - start,
            queue_s=ran_from - prepared,
            forward_s=ran_to - ran_from,
            return_s=time.perf_counter() - ran_to,
            batch_size=size,
        )
        self._phases.add(queue, times)
        return vector

    async def _run_batch(self, queue: str, items: list[Any]) -> list[_Ran]:
        """Run one batch in the model thread; one (vector, forward start, forward end,
        batch size) per input item."""
        forward: Callable[[Sequence[Any]], np.ndarray] = (
            self._encoder.encode_tokens if queue == "text" else self._encoder.encode_pixels
        )
        loop = asyncio.get_running_loop()
        # The Batcher runs at most `concurrent` batches at once, so a slot is always free.
        slot = min(self._free_slots)
        self._free_slots.remove(slot)
        try:
            vectors, ran_from, ran_to = await loop.run_in_executor(
                self._model_slots[slot], self._timed, queue, forward, items
            )
        finally:
            self._free_slots.append(slot)
        return [(vector, ran_from, ran_to, len(items)) for vector in vectors]

    def _timed(
        self, queue: str, forward: Callable[[Sequence[T]], np.ndarray], items: list[T]
    ) -> tuple[np.ndarray, float, float]:
        """Run a forward in a model thread, with its share of the torch threads, recording
        its start so check_health can spot a hang. Returns the output rows and the
        forward's start and end (`time.perf_counter`).

        A forward that runs alone gets every thread (lowest latency at low load); while
        others run, a forward gets `threads // running` (at least 1), so concurrent batches
        do not oversubscribe the cores.
        """
        with self._active_lock:
            self._active_forwards += 1
            torch.set_num_threads(max(1, self._threads // self._active_forwards))
            started = time.monotonic()
            self._forward_starts[threading.get_ident()] = (queue, started)
        ran_from = time.perf_counter()
        try:
            vectors = forward(items)
        finally:
            with self._active_lock:
                del self._forward_starts[threading.get_ident()]
                self._active_forwards -= 1
                self._forward_seconds[queue] += time.monotonic() - started
        return vectors, ran_from, time.perf_counter()

    def _lookup_image(self, data: bytes) -> tuple[bytes, np.ndarray | ImageInput]:
        """The cache key and either the cached vector or the prepared pixels (in a worker)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument("image must be bytes")
        key = content_key(self._model_key, "image", bytes(data))
        cached = self._cache.get(key)
        if cached is not None:
            return key, cached
        image = decode_image(
            data,
            max_bytes=self._limits.max_image_bytes,
            max_pixels=self._limits.max_image_pixels,
            min_side=self._encoder.min_image_side,
        )
        return key, self._encoder.prepare_image(image)

    def _text_options(self, options: TextOptions | None) -> tuple[str, Any]:
        """The template and long-text strategy to use: the request's, else the settings'."""
        template = self._settings.prompt_template
        long_text = self._settings.long_text
        if options is not None:
            template = check_template(
                options.prompt_template if options.prompt_template is not None else template
            )
            long_text = options.long_text or long_text
        if long_text not in ("truncate", "sliding_window", "reject"):
            raise InvalidArgument(f"long_text: unknown strategy {long_text!r}")
        return template, long_text

    def _apply_batch_limits(self, max_batch_size: Any, batch_wait_timeout_s: Any) -> None:
        """Validate and set the limits of both batch queues."""
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise TypeError(f"max_batch_size must be an integer, got {max_batch_size!r}")
        if not 1 <= max_batch_size <= 256:
            raise ValueError(f"max_batch_size must be in [1, 256], got {max_batch_size}")
        if not isinstance(batch_wait_timeout_s, (int, float)) or not (
            0 <= batch_wait_timeout_s <= 1
        ):
            raise ValueError(
                f"batch_wait_timeout_s must be in [0, 1] seconds, got {batch_wait_timeout_s!r}"
            )
        self._max_batch_size = max_batch_size
        self._batch_wait_timeout_s = float(batch_wait_timeout_s)
        self._batcher.set_limits(self._max_batch_size, self._batch_wait_timeout_s)


def _check_text(text: Any, max_bytes: int) -> None:
    """Refuse what the model must never see: non-strings, blank text, oversize text."""
    if not isinstance(text, str):
        raise InvalidArgument("text must be a string")
    if not text.strip():
        raise InvalidArgument("text is empty or only whitespace")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates would fail the tokenizer mid-batch
        raise InvalidArgument("text is not valid Unicode (it has unpaired surrogates)") from exc
    if size > max_bytes:
        raise InvalidArgument(f"text is {size} bytes of UTF-8, over the limit of {max_bytes}")
