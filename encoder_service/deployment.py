"""The encoder as a Ray Serve deployment: validated single items in, dynamic batches to the model.

Request path of one image: bytes → decode + preprocess in a bounded worker pool (a bad image
fails here, alone) → image batch queue (`@serve.batch`) → one model forward per batch in the
model thread → one normalised vector back. Texts skip the decode step and use their own queue.

Errors: an `InvalidArgument` raised here reaches a DeploymentHandle caller as a
`RayTaskError(InvalidArgument)`, which is an instance of `InvalidArgument` (so `except
InvalidArgument` works) but whose `str()` is Ray's dump (actor name, pid, stack, paths).
Show callers `str(exc.cause)`: `.cause` is the original exception.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from ray import serve
from ray.serve import Application

from clipsearch.errors import InvalidArgument
from clipsearch.settings import EncoderSettings, LimitSettings
from encoder_service.images import decode_image
from encoder_service.model import ClipEncoder

DECODE_WORKERS = 2
"""Images decoded and preprocessed at once per replica (bounds CPU and memory spikes)."""
FORWARD_STUCK_AFTER_S = 120.0
"""A model forward running longer than this makes the replica report itself unhealthy."""
# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with the
# gateway, shards and decode workers, spinning threads starve each other: a ViT-B/32 image
# forward with 2 torch threads under load measured 0.5 img/s spinning vs 5.2 img/s passive.
REPLICA_ENV_VARS = {"OMP_WAIT_POLICY": "PASSIVE"}
_BATCH_KEYS = frozenset({"max_batch_size", "batch_wait_timeout_s"})

T = TypeVar("T")


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
            "runtime_env": {"env_vars": dict(REPLICA_ENV_VARS)},
        },
        user_config=batch_config(encoder),
    )
    return deployment.bind(encoder, limits)


@serve.deployment
class EncoderDeployment:
    """One encoder replica: separate batch queues for text and images over one model.

    The `@serve.batch` queues belong to the class, so only one instance may live in a
    process; Serve guarantees that (one replica per actor).
    """

    def __init__(self, encoder: EncoderSettings, limits: LimitSettings) -> None:
        """Load the model and set the initial batch limits from settings."""
        self._limits = limits
        self._encoder = ClipEncoder(
            encoder.model,
            device=encoder.device,
            dtype=encoder.dtype,
            torch_threads=encoder.torch_threads,
        )
        self._decode_pool = ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode")
        # One forward at a time: concurrent text and image batches would only fight over
        # the same intra-op threads (CPU) or stream (GPU).
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._batch_sizes: dict[str, Counter[int]] = {"text": Counter(), "image": Counter()}
        self._forward_started: float | None = None
        self._apply_batch_limits(encoder.max_batch_size, encoder.batch_wait_timeout_s)

    async def encode_text(self, text: str) -> np.ndarray:
        """Embed one text (joins the text batch queue).

        Returns:
            A (dim,) float32 unit vector.

        Raises:
            InvalidArgument: The text is not a string, empty/whitespace, or over the limit.
        """
        _check_text(text, self._limits.max_text_bytes)
        return await self._text_batch(text)

    async def encode_image(self, data: bytes) -> np.ndarray:
        """Embed one encoded image: decoded and preprocessed first, then batched.

        Returns:
            A (dim,) float32 unit vector.

        Raises:
            InvalidArgument: The bytes are not an acceptable image (see `decode_image`).
        """
        loop = asyncio.get_running_loop()
        # Decoding before the queue keeps a bad image from failing a shared batch.
        pixels = await loop.run_in_executor(self._decode_pool, self._prepare_image, data)
        return await self._image_batch(pixels)

    async def info(self) -> dict[str, Any]:
        """What the model is: `{"model_id": str, "dim": int, "max_text_tokens": int}`."""
        return {
            "model_id": self._encoder.model_id,
            "dim": self._encoder.dim,
            "max_text_tokens": self._encoder.max_text_tokens,
        }

    async def batch_stats(self) -> dict[str, dict[int, int]]:
        """How many batches of each size each queue has run since the replica started."""
        return {queue: dict(sizes) for queue, sizes in self._batch_sizes.items()}

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
        started = self._forward_started
        if started is not None and time.monotonic() - started > FORWARD_STUCK_AFTER_S:
            raise RuntimeError(f"model forward running for over {FORWARD_STUCK_AFTER_S:.0f} s")
        for name, handler in (("text", self._text_batch), ("image", self._image_batch)):
            # A private Ray helper, hence getattr; a dead loop would hang every later call.
            is_alive = getattr(handler, "_is_batching_task_alive", None)
            if is_alive is not None and not await is_alive():
                raise RuntimeError(f"the {name} batch loop has stopped")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        return await self._run_batch("text", self._encoder.encode_texts, texts)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _image_batch(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        return await self._run_batch("image", self._encoder.encode_pixels, pixels)

    async def _run_batch(
        self, queue: str, forward: Callable[[Sequence[T]], np.ndarray], items: list[T]
    ) -> list[np.ndarray]:
        """Run one batch in the model thread; one output row per input item."""
        self._batch_sizes[queue][len(items)] += 1
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._model_pool, self._timed, forward, items)
        return list(vectors)

    def _timed(self, forward: Callable[[Sequence[T]], np.ndarray], items: list[T]) -> np.ndarray:
        """Run a forward while recording its start, so check_health can spot a hang."""
        self._forward_started = time.monotonic()
        try:
            return forward(items)
        finally:
            self._forward_started = None

    def _prepare_image(self, data: bytes) -> torch.Tensor:
        """Decode with the configured limits and preprocess (runs in a decode worker)."""
        image = decode_image(
            data,
            max_bytes=self._limits.max_image_bytes,
            max_pixels=self._limits.max_image_pixels,
        )
        return self._encoder.prepare_image(image)

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
        handlers: tuple[Any, ...] = (self._text_batch, self._image_batch)
        for handler in handlers:
            handler.set_max_batch_size(self._max_batch_size)
            handler.set_batch_wait_timeout_s(self._batch_wait_timeout_s)


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
