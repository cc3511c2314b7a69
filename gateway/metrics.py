"""Prometheus metrics for the gateway, served over HTTP on their own port.

Each gateway owns a registry (so tests can run several). Names:

- `clipsearch_rpc_total{method,code}` and `clipsearch_rpc_seconds{method,code}` (histogram)
- `clipsearch_rpc_in_flight{method_class}`, `clipsearch_rpc_rejected_total{method_class}`
- `clipsearch_stage_seconds{stage}`: decode, encode, search (fan-out), merge, rerank, total
- `clipsearch_shard_vectors{shard,modality}`, `clipsearch_shard_documents{shard}`,
  `clipsearch_shard_probe_seconds{shard}` (the health canary's latency per shard)
- `clipsearch_encoder_probe_seconds`; `clipsearch_encoder{figure}`: every number in the
  encoder's stats (cache hits and hit ratio, mean batch size per queue, ...)
- `clipsearch_encoder_batches{queue,size}`: batches of each size the encoder has run
- `clipsearch_encoder_queue_depth{queue}`: requests waiting for the model per queue (`text`,
  `image`), when the encoder deployment offers `queue_depths()`

Encoder figures are one replica's view (the one that answered), refreshed with health.
The per-call series (RPC count and latency, stage latencies) are plain lists the event loop
adds to and a collector turns into Prometheus families at scrape time: a prometheus_client
Histogram takes a lock twice per observation (sum and bucket), 8 observations a Search.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class LoopHistograms(Collector):
    """Histograms (and, optionally, a counter of the same observations) by label values,
    written only by the event loop without a lock and read by the scrape thread.

    Each label set's series is one list, `[bucket counts..., +Inf count, sum]`; the scrape
    copies it in one C call, so the buckets it reports are consistent with each other (the
    sum may lag one observation behind, never more).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        counter: tuple[str, str] | None = None,
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = buckets
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._counter = counter  # (name, documentation) of a counter of the same calls
        self.series: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def series_for(self, *label_values: str) -> list[float]:
        """The list to add observations to (see `observe`), made on first use."""
        series = self.series.get(label_values)
        if series is None:
            self._created[label_values] = time.time()
            series = self.series[label_values] = [0.0] * (len(self.bounds) + 2)
        return series

    def observe(self, series: list[float], value: float) -> None:
        """One observation into a list from `series_for`."""
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def collect(self) -> Iterator[Metric]:
        snapshot = [(labels, list(s)) for labels, s in self.series.copy().items()]
        hist = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        counter = None
        if self._counter is not None:
            counter = CounterMetricFamily(*self._counter, labels=self.labels)
        for labels, s in snapshot:
            cumulative, buckets = 0.0, []
            for le, n in zip(self._les, s[:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            hist.add_metric(labels, buckets, s[-1])
            created = self._created.get(labels)
            if created is not None:  # as prometheus_client's own Histogram reports it
                label_map = dict(zip(self.labels, labels, strict=True))
                hist.samples.append(Sample(f"{self.name}_created", label_map, created))
            if counter is not None:
                counter.add_metric(labels, cumulative, created=created)
        if counter is not None:
            yield counter
        yield hist


class GatewayMetrics:
    """All gateway metrics in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # clipsearch_rpc_total and clipsearch_rpc_seconds, from the same observations
        self.rpc_seconds = LoopHistograms(
            "clipsearch_rpc_seconds",
            "RPC latency by method and status",
            ("method", "code"),
            _LATENCY_BUCKETS,
            counter=("clipsearch_rpc", "RPCs by method and status"),
        )
        r.register(self.rpc_seconds)
        self.in_flight = Gauge(
            "clipsearch_rpc_in_flight", "Calls in flight", ["method_class"], registry=r
        )
        self.rejected = Counter(
            "clipsearch_rpc_rejected",
            "Calls refused by admission control",
            ["method_class"],
            registry=r,
        )
        self.stage_seconds = LoopHistograms(
            "clipsearch_stage_seconds", "Time per search stage", ("stage",), _LATENCY_BUCKETS
        )
        r.register(self.stage_seconds)
        self.shard_vectors = Gauge(
            "clipsearch_shard_vectors", "Vectors per shard", ["shard", "modality"], registry=r
        )
        self.shard_documents = Gauge(
            "clipsearch_shard_documents", "Documents per shard", ["shard"], registry=r
        )
        self.shard_probe_seconds = Gauge(
            "clipsearch_shard_probe_seconds",
            "Latency of the last canary search per shard",
            ["shard"],
            registry=r,
        )
        self.encoder_probe_seconds = Gauge(
            "clipsearch_encoder_probe_seconds",
            "Latency of the last canary text encode",
            registry=r,
        )
        self.encoder_stat = Gauge(
            "clipsearch_encoder",
            "Encoder figures from its stats (cache_hit_ratio, batch_size, queue_depth, ...)",
            ["figure"],
            registry=r,
        )
        self.healthy = Gauge(
            "clipsearch_healthy", "1 when the service reports SERVING", ["service"], registry=r
        )
        self.encoder_batches = Gauge(
            "clipsearch_encoder_batches",
            "Batches the encoder has run, by queue and batch size (one replica's view)",
            ["queue", "size"],
            registry=r,
        )
        self.encoder_queue_depth = Gauge(
            "clipsearch_encoder_queue_depth",
            "Requests waiting for the model, per encoder queue (one replica's view)",
            ["queue"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._timing_stages: dict[type, tuple[tuple[str, list[float]], ...]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached (the event loop is the only writer)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def rpc_started(self, method_class: str) -> None:
        self._child(self.in_flight, method_class).inc()

    def rpc_finished(self, method_class: str) -> None:
        self._child(self.in_flight, method_class).dec()

    def rpc_rejected(self, method_class: str) -> None:
        self._child(self.rejected, method_class).inc()

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        h = self.rpc_seconds
        h.observe(h.series_for(method, code), seconds)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        h = self.stage_seconds
        for stage, ms in timings_ms.items():
            h.observe(h.series_for(stage), ms / 1000.0)

    def observe_timings(self, timings: Any) -> None:
        """The stage histograms from a response's Timings message: each `<stage>_ms` field
        that is set (non-zero, as `ListFields` tells it), without building a dict per call."""
        h = self.stage_seconds
        stages = self._timing_stages.get(type(timings))
        if stages is None:
            stages = self._timing_stages[type(timings)] = tuple(
                (f.name, h.series_for(f.name.removesuffix("_ms")))
                for f in timings.DESCRIPTOR.fields
                if f.name.endswith("_ms")
            )
        bounds = h.bounds
        for name, series in stages:
            ms = getattr(timings, name)
            if ms:
                seconds = ms / 1000.0
                series[bisect_left(bounds, seconds)] += 1  # `observe`, inlined
                series[-1] += seconds

    def observe_shard_stats(self, stats: Any) -> None:
        shard = str(stats.shard)
        self.shard_documents.labels(shard).set(stats.documents)
        self.shard_vectors.labels(shard, "image").set(stats.image_vectors)
        self.shard_vectors.labels(shard, "text").set(stats.text_vectors)

    def observe_encoder_stats(self, stats: Any) -> None:
        """Every numeric field of the encoder's stats object (whatever it carries)."""
        fields = getattr(stats, "__dataclass_fields__", None) or {}
        for name in fields:
            value = getattr(stats, name, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.encoder_stat.labels(name).set(float(value))
        cache = getattr(stats, "cache", None) or {}
        for name, value in cache.items():
            if isinstance(value, int | float):
                self.encoder_stat.labels(f"cache_{name}").set(float(value))
        hits, misses = cache.get("hits"), cache.get("misses")
        if isinstance(hits, int) and isinstance(misses, int) and hits + misses > 0:
            self.encoder_stat.labels("cache_hit_ratio").set(hits / (hits + misses))
        for kind, seconds in (getattr(stats, "forward_seconds", None) or {}).items():
            if isinstance(seconds, int | float):
                self.encoder_stat.labels(f"{kind}_forward_seconds").set(float(seconds))
        for kind, sizes in (getattr(stats, "batch_sizes", None) or {}).items():
            for size, n in sizes.items():
                self.encoder_batches.labels(kind, str(size)).set(n)
            batches = sum(sizes.values())
            if batches:
                mean = sum(size * n for size, n in sizes.items()) / batches
                self.encoder_stat.labels(f"{kind}_mean_batch_size").set(mean)

    async def observe_encoder_queues(self, encoder: Any) -> bool:
        """Set the queue-depth gauge from the encoder; False when it cannot tell.

        Asks the backend's `queue_depths()` if it has one, else the `queue_depths` method of
        the Serve deployment behind it (older deployments lack it: then nothing is set).
        """
        try:
            depths = await _queue_depths(encoder)
        except Exception:  # a deployment without the method, or one that failed to answer
            return False
        if depths is None:
            return False
        for queue, n in depths.items():
            self.encoder_queue_depth.labels(str(queue)).set(float(n))
        return True

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the HTTP endpoint in a thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, int(server.server_port)


async def _queue_depths(encoder: Any) -> dict[str, int] | None:
    method = getattr(encoder, "queue_depths", None)
    if method is not None:
        return dict(await method())
    handle = getattr(encoder, "_handle", None)  # RayEncoder's Serve DeploymentHandle
    if handle is None:
        return None
    return dict(await handle.queue_depths.remote())
