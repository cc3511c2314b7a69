"""The encoder's queue-depth and batch-size gauges: read through the backend, or through
the Serve handle behind it, and tolerated when the deployment cannot tell."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest

from clipsearch.types import EncoderStats
from gateway.metrics import GatewayMetrics


class _Backend:
    async def queue_depths(self) -> dict[str, int]:
        return {"text": 3, "image": 1}


class _Response:
    def __init__(self, value: Any) -> None:
        self._value = value

    def __await__(self) -> Any:
        async def answer() -> Any:
            if isinstance(self._value, Exception):
                raise self._value
            return self._value

        return answer().__await__()


class _Method:
    def __init__(self, value: Any) -> None:
        self._value = value

    def remote(self) -> _Response:
        return _Response(self._value)


class _Handle:
    """Like a DeploymentHandle: any attribute is a method; a missing one fails when awaited."""

    def __init__(self, depths: Any) -> None:
        self._depths = depths

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._depths)


class _RayLike:
    def __init__(self, handle: _Handle) -> None:
        self._handle = handle


def _depth(metrics: GatewayMetrics, queue: str) -> float | None:
    return metrics.registry.get_sample_value("clipsearch_encoder_queue_depth", {"queue": queue})


async def test_queue_depth_from_the_backend() -> None:
    metrics = GatewayMetrics()
    assert await metrics.observe_encoder_queues(_Backend())
    assert _depth(metrics, "text") == 3 and _depth(metrics, "image") == 1


async def test_queue_depth_through_the_serve_handle() -> None:
    metrics = GatewayMetrics()
    assert await metrics.observe_encoder_queues(_RayLike(_Handle({"text": 0, "image": 5})))
    assert _depth(metrics, "image") == 5


async def test_a_deployment_without_queue_depths_is_tolerated() -> None:
    metrics = GatewayMetrics()
    missing = _RayLike(_Handle(AttributeError("no method queue_depths")))
    assert not await metrics.observe_encoder_queues(missing)
    assert not await metrics.observe_encoder_queues(object())
    assert _depth(metrics, "text") is None
    assert b"clipsearch_encoder_queue_depth" in generate_latest(metrics.registry)  # declared


def test_batch_sizes_become_a_gauge_per_queue_and_size() -> None:
    metrics = GatewayMetrics()
    stats = EncoderStats("m", 8, "cpu", "fp32", 77, 224, 1, batch_sizes={"text": {1: 4, 8: 2}})
    metrics.observe_encoder_stats(stats)
    get = metrics.registry.get_sample_value
    assert get("clipsearch_encoder_batches", {"queue": "text", "size": "8"}) == 2
    assert get("clipsearch_encoder", {"figure": "text_mean_batch_size"}) == (4 + 16) / 6


def test_model_time_and_slots_become_figures() -> None:
    metrics = GatewayMetrics()
    stats = EncoderStats(
        "m",
        8,
        "cpu",
        "fp32",
        77,
        224,
        1,
        forward_seconds={"text": 2.5, "image": 4.0},
        model_slots=2,
    )
    metrics.observe_encoder_stats(stats)
    get = metrics.registry.get_sample_value
    assert get("clipsearch_encoder", {"figure": "text_forward_seconds"}) == 2.5
    assert get("clipsearch_encoder", {"figure": "image_forward_seconds"}) == 4.0
    assert get("clipsearch_encoder", {"figure": "model_slots"}) == 2
