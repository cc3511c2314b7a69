"""Encoder Stats count every replica's batches and cache, not only the replica asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from clipsearch.settings import EncoderSettings, LimitSettings
from encoder_service.deployment import build_encoder_app
from encoder_service.replica_stats import ReplicaCounters, StatsBoard, merge
from gateway.backends import RayEncoder
from tests.encoder_fixtures import make_tiny_clip

APP = "enc-stats-test"
RESULT_TIMEOUT_S = 60


def test_merge_sums_histograms_cache_counters_and_model_time() -> None:
    one = ReplicaCounters(
        {"text": {8: 2, 1: 1}, "image": {}},
        {"hits": 1, "entries": 3},
        forward_seconds={"text": 1.5, "image": 0.0},
        model_slots=2,
    )
    two = ReplicaCounters(
        {"text": {8: 1, 3: 1}, "image": {2: 4}},
        {"hits": 2, "entries": 1},
        forward_seconds={"text": 0.5, "image": 2.0},
        model_slots=2,
    )
    assert merge([one, two]) == ReplicaCounters(
        {"text": {8: 3, 1: 1, 3: 1}, "image": {2: 4}},
        {"hits": 3, "entries": 4},
        forward_seconds={"text": 2.0, "image": 2.0},
        model_slots=4,
    )


def test_board_keeps_the_latest_report_per_replica_and_forgets_silent_ones() -> None:
    now = [0.0]
    board = StatsBoard(clock=lambda: now[0])
    board.report("a", ReplicaCounters({"text": {1: 1}}))
    board.report("a", ReplicaCounters({"text": {1: 5}}))  # replaces, never adds
    board.report("b", ReplicaCounters({"text": {2: 1}}))
    assert board.merged(stale_s=10) == (2, ReplicaCounters({"text": {1: 5, 2: 1}}, {}))
    now[0] = 8.0
    board.report("b", ReplicaCounters({"text": {2: 2}}))
    now[0] = 12.0  # a has been silent for 12 s: it died, and its counts go with it
    assert board.merged(stale_s=10) == (1, ReplicaCounters({"text": {2: 2}}, {}))


@pytest.fixture(scope="module")
def two_replicas(
    ray_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DeploymentHandle]:
    model = make_tiny_clip(tmp_path_factory.mktemp("tiny-clip-stats"), dim=16)
    settings = EncoderSettings(
        model=str(model), replicas=2, num_cpus=0.25, max_ongoing_requests=32, cache_bytes=0
    )
    yield serve.run(build_encoder_app(settings, LimitSettings()), name=APP, route_prefix=None)
    serve.delete(APP)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_stats_sum_the_batches_of_both_replicas(two_replicas: DeploymentHandle) -> None:
    responses = [two_replicas.encode_text.remote(f"caller {i}") for i in range(64)]
    assert all(r.result(timeout_s=RESULT_TIMEOUT_S).shape == (16,) for r in responses)
    for _ in range(60):  # each replica reports every REPORT_S: allow a few rounds
        stats = two_replicas.stats.remote().result(timeout_s=RESULT_TIMEOUT_S)
        items = sum(size * count for size, count in stats.batch_sizes["text"].items())
        if items == 64:
            break
        time.sleep(0.5)
    assert items == 64, stats.batch_sizes
    # A replica's own histogram holds only its part: both took part, so the sum was needed.
    own = [two_replicas.batch_stats.remote().result(timeout_s=RESULT_TIMEOUT_S) for _ in range(20)]
    assert any(0 < sum(s * c for s, c in h["text"].items()) < 64 for h in own)


def test_board_names_the_channels_of_live_replicas() -> None:
    now = [0.0]
    board = StatsBoard(clock=lambda: now[0])
    board.report("a", ReplicaCounters(channel=("node", "\0a")))
    board.report("b", ReplicaCounters())  # no channel (not Linux, or not served)
    now[0] = 5.0
    board.report("c", ReplicaCounters(channel=("node", "\0c")))
    assert board.channels(stale_s=10) == [("node", "\0a"), ("node", "\0c")]
    now[0] = 12.0
    assert board.channels(stale_s=10) == [("node", "\0c")]


@pytest.mark.integration
@pytest.mark.timeout(300)
async def test_the_gateway_spreads_calls_over_both_replicas_channels(
    two_replicas: DeploymentHandle,
) -> None:
    for _ in range(120):  # each replica reports its channel every REPORT_S
        addresses = await two_replicas.channel_addresses.remote()
        if len(addresses) == 2:
            break
        await asyncio.sleep(0.5)
    assert len({address for _, address in addresses}) == 2
    encoder = RayEncoder(two_replicas, "tiny", 16)
    assert await encoder.connect() and encoder.channels.open_channels == 2
    vectors = await asyncio.gather(*(encoder.encode_texts([f"spread {i}"]) for i in range(64)))
    assert all(v.shape == (1, 16) for v in vectors)
    # Counted on the gateway's side: each channel is a socket to one replica (two addresses
    # above), so items on both are items served by both. (Asking the replicas through Serve
    # depends on its router reaching both: 160 stats calls once all went to one, in CI.)
    sent = encoder.channels.items_sent()
    assert set(sent) == {address for _, address in addresses}
    assert sum(sent.values()) == 64 and all(sent.values()), sent
