"""The direct encoder channel with real Ray Serve replicas and real sockets: calls take it
when they can, answer as the handle does, survive a killed replica and still fill batches."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from clipsearch.client import Client
from clipsearch.errors import Unavailable
from clipsearch.launcher import ENCODER_APP
from clipsearch.settings import EncoderSettings, LimitSettings
from clipsearch.types import TextOptions
from encoder_service.channel import supported
from encoder_service.deployment import build_encoder_app
from gateway.backends import RayEncoder
from tests.encoder_fixtures import make_tiny_clip

APP = "enc-channel-test"
LONG = " ".join(f"word{i} the cat" for i in range(30))  # over the tiny model's 16 tokens
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not supported(), reason="abstract Unix sockets are Linux's"),
]


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def deploy(model_dir: Path, app: str) -> DeploymentHandle:
    encoder = EncoderSettings(
        model=str(model_dir),
        num_cpus=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.1,  # 64 callers fill whole batches on a slow machine
        max_ongoing_requests=64,
    )
    return serve.run(build_encoder_app(encoder, LimitSettings()), name=app, route_prefix=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip-channel"), dim=32)


@pytest.fixture(scope="module")
def handle(ray_cluster: None, model_dir: Path) -> Iterator[DeploymentHandle]:
    yield deploy(model_dir, APP)
    serve.delete(APP)


async def connected(handle: DeploymentHandle, model_dir: Path, **kwargs: Any) -> RayEncoder:
    encoder = RayEncoder(handle, str(model_dir), 32, **kwargs)
    assert await encoder.connect()
    return encoder


async def channel_requests(handle: DeploymentHandle) -> int:
    return int((await handle.channel_stats.remote())["requests"])


async def outcome(call: Any) -> np.ndarray | str:
    """The vectors, or the error's class and message."""
    try:
        return await call  # type: ignore[no-any-return]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


async def test_calls_go_over_the_channel_and_match_the_handle(
    handle: DeploymentHandle, model_dir: Path
) -> None:
    encoder = await connected(handle, model_dir)
    texts = ["the cat", "a dog on a beach", LONG]
    images = [png((200, 20, 20)), png((20, 200, 20), (64, 64))]
    options = TextOptions("a photo of {}", "sliding_window")
    before = await channel_requests(handle)
    over_channel = [
        await encoder.encode_texts(texts),
        await encoder.encode_texts(texts, options),
        await encoder.encode_images(images),
    ]
    assert await channel_requests(handle) - before == 8 == encoder.channel_calls
    encoder.use_channel = False
    via_handle = [
        await encoder.encode_texts(texts),
        await encoder.encode_texts(texts, options),
        await encoder.encode_images(images),
    ]
    assert await channel_requests(handle) - before == 8
    for got, expected in zip(over_channel, via_handle, strict=True):
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


async def test_bad_input_fails_the_same_way_over_the_channel(
    handle: DeploymentHandle, model_dir: Path
) -> None:
    encoder = await connected(handle, model_dir)
    good = png((1, 1, 1))
    calls = [
        lambda: encoder.encode_texts(["fine", "   "]),
        lambda: encoder.encode_texts([" "]),
        lambda: encoder.encode_texts([LONG], TextOptions(long_text="reject")),
        lambda: encoder.encode_texts(["x"], TextOptions("no placeholder")),
        lambda: encoder.encode_images([good, good[:30]]),
        lambda: encoder.encode_images([b"not an image"]),
    ]
    before = await channel_requests(handle)
    over_channel = [await outcome(call()) for call in calls]
    assert await channel_requests(handle) - before == 8
    encoder.use_channel = False
    via_handle = [await outcome(call()) for call in calls]
    assert over_channel == via_handle
    assert over_channel[0] == "InvalidArgument: texts[1]: text is empty or only whitespace"
    assert all(isinstance(o, str) and o.startswith("InvalidArgument: ") for o in over_channel)


async def test_64_concurrent_callers_fill_batches_through_the_channel(
    handle: DeploymentHandle, model_dir: Path
) -> None:
    encoder = await connected(handle, model_dir)
    sizes_before = Counter((await handle.batch_stats.remote())["image"])
    stats_before = await handle.channel_stats.remote()
    images = [png((i, 3 * i, 200 - i)) for i in range(64)]  # colours no other test encodes
    vectors = await asyncio.gather(*(encoder.encode_images([data]) for data in images))
    assert all(v.shape == (1, 32) for v in vectors)
    stats = await handle.channel_stats.remote()
    assert stats["items"] - stats_before["items"] == 64  # every item rode the channel
    sizes = Counter((await handle.batch_stats.remote())["image"]) - sizes_before
    assert sum(size * count for size, count in sizes.items()) == 64
    assert max(sizes) == 8
    assert sizes[8] * 8 >= 32, sizes  # at least half of the items rode in full batches


async def test_cancelled_callers_leave_the_channel_usable(
    handle: DeploymentHandle, model_dir: Path
) -> None:
    encoder = await connected(handle, model_dir, max_in_flight=1000)
    calls = [asyncio.ensure_future(encoder.encode_texts([f"maybe {i}"])) for i in range(32)]
    await asyncio.sleep(0)
    for call in calls[::2]:
        call.cancel()
    for call in calls[1::2]:
        assert (await call).shape == (1, 32)
    after = await asyncio.gather(*(encoder.encode_texts([f"after {i}"]) for i in range(16)))
    assert all(v.shape == (1, 32) for v in after)
    assert encoder.channels.open_channels == 1
    for _ in range(100):  # bounded: cancelled items leave the replica
        if (await handle.channel_stats.remote())["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await handle.channel_stats.remote())["in_flight"] == 0


class OtherNode:
    """The handle as a gateway on another node sees it: every replica's channel elsewhere."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self.channel_addresses = self  # `.channel_addresses.remote()` lands on `remote`

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    async def remote(self) -> list[tuple[str, str]]:
        found = await self._handle.channel_addresses.remote()
        return [("another-node", address) for _, address in found]


async def test_a_gateway_on_another_node_uses_the_handle(
    handle: DeploymentHandle, model_dir: Path
) -> None:
    encoder = RayEncoder(OtherNode(handle), str(model_dir), 32)
    assert not await encoder.connect()
    before = await channel_requests(handle)
    vectors = await encoder.encode_texts(["from afar", "and again"])
    assert vectors.shape == (2, 32)
    assert await channel_requests(handle) == before and encoder.channel_calls == 0


async def test_a_killed_replica_falls_back_to_the_handle_and_the_channel_returns(
    ray_cluster: None, model_dir: Path
) -> None:
    app = f"{APP}-kill"
    handle = deploy(model_dir, app)
    try:
        encoder = await connected(handle, model_dir)
        old = await handle.channel_stats.remote()
        calls = [asyncio.ensure_future(outcome(encoder.encode_texts([f"k{i}"]))) for i in range(8)]
        await asyncio.sleep(0.01)
        os.kill(old["pid"], signal.SIGKILL)  # the replica's worker: a process Serve started
        # Calls caught by the kill either finish (re-sent through the handle) or fail as
        # handle calls to a dead replica do: UNAVAILABLE, never anything else.
        for result in await asyncio.gather(*calls):
            assert isinstance(result, np.ndarray) or result.startswith("Unavailable: "), result
        new = await _channel_back(encoder, handle, old["pid"])
        assert new["pid"] != old["pid"] and new["requests"] >= 1
    finally:
        serve.delete(app)


async def _channel_back(encoder: RayEncoder, handle: DeploymentHandle, old_pid: int) -> Any:
    """Keep calling (bounded) until a restarted replica serves calls over its channel."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(encoder.encode_texts(["are you back"]), 30)
            stats = await handle.channel_stats.remote()
        except (Unavailable, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        if stats["pid"] != old_pid and stats["requests"]:
            return stats
        await asyncio.sleep(0.2)
    raise AssertionError("the channel did not come back within 120 s")


def test_grpc_status_and_message_match_over_the_channel(client: Client, stack: Any) -> None:
    encoder = stack.stack.coordinator.encoder
    assert stack.run(encoder.connect())
    replica = serve.get_app_handle(ENCODER_APP)
    photo = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo, "JPEG")
    data = photo.getvalue()
    demo_long = " ".join(["a red circle beside a blue star"] * 12)  # over the demo's context

    def refused() -> list[tuple[grpc.StatusCode, str]]:
        calls = [
            lambda: client.encode_image([data, data[: len(data) // 2]]),
            lambda: client.encode_text([demo_long], options=TextOptions(long_text="reject")),
        ]
        statuses = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            statuses.append((err.value.code(), str(err.value.details())))
        return statuses

    before = replica.channel_stats.remote().result(timeout_s=60)["requests"]
    over_channel = refused()
    assert replica.channel_stats.remote().result(timeout_s=60)["requests"] - before == 3
    encoder.use_channel = False
    try:
        assert refused() == over_channel
    finally:
        encoder.use_channel = True
    assert over_channel[0] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[1]: image is truncated or corrupt",
    )
    assert over_channel[1][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the model's context of 32" in over_channel[1][1]
    assert client.encode_text(["still serving"]).shape == (1, 128)
