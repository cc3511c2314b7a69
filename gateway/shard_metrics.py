"""Prometheus figures of the gateway's shard calls, read from the shard backends when
scraped (nothing is counted twice on the search path):

- `clipsearch_shard_search_calls_total{shard,kind}`: calls that carried searches to a shard,
  `alone` (a free slot: sent at once) or `batched` (coalesced while both slots were busy)
- `clipsearch_shard_search_batches_total{shard,size}`: batched calls by how many searches
  each carried (the coalescer's batch-size histogram)
- `clipsearch_shard_channel_calls_total{shard}`: calls sent over the direct search channel
  (the rest went as Ray actor calls); `clipsearch_shard_channel_open{shard}`: 1 while open

Backends without these counters (in-process shards in tests) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class ShardCallCollector:
    """A custom collector over the coordinator's shard backends."""

    def __init__(self, shards: Sequence[Any]) -> None:
        self._shards = shards

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "clipsearch_shard_search_calls",
            "Calls that carried searches to a shard, alone or batched",
            labels=["shard", "kind"],
        )
        batches = CounterMetricFamily(
            "clipsearch_shard_search_batches",
            "Batched shard calls by the number of searches they carried",
            labels=["shard", "size"],
        )
        channel = CounterMetricFamily(
            "clipsearch_shard_channel_calls",
            "Shard calls sent over the direct search channel",
            labels=["shard"],
        )
        channel_open = GaugeMetricFamily(
            "clipsearch_shard_channel_open",
            "1 while the shard's direct search channel is open",
            labels=["shard"],
        )
        for number, shard in enumerate(self._shards):
            name = str(number)
            coalescer = getattr(shard, "searches", None)
            if coalescer is not None:
                calls.add_metric([name, "alone"], coalescer.alone)
                calls.add_metric([name, "batched"], sum(coalescer.batches.values()))
                for size, count in sorted(coalescer.batches.items()):
                    batches.add_metric([name, str(size)], count)
            if hasattr(shard, "channel_calls"):
                channel.add_metric([name], shard.channel_calls)
                channel_open.add_metric([name], 1.0 if shard.channel_open else 0.0)
        yield from (calls, batches, channel, channel_open)
