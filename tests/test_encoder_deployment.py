"""The encoder Ray Serve deployment: results, errors across Ray, batching, reconfiguration.

How a domain error crosses Ray (checked in `test_bad_image_...`): the caller gets a
`RayTaskError(InvalidArgument)`, which *is an instance of* `InvalidArgument` (so
`except InvalidArgument` works), but its `str()` and `.args` carry Ray's traceback text.
The caller-safe message is `str(exc.cause)`: `.cause` is the original exception; `str(exc)`
names the replica actor, its pid and the replica's stack frames with file paths.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle

from clipsearch.errors import InvalidArgument
from clipsearch.settings import EncoderSettings, LimitSettings
from clipsearch.types import EncoderStats, TextOptions
from encoder_service.deployment import (
    EncoderDeployment,
    _check_text,
    build_encoder_app,
    default_torch_threads,
    replica_env,
)
from encoder_service.images import decode_image
from encoder_service.model import ClipEncoder
from encoder_service.phases import RECENT, PhaseLog, PhaseTimes
from tests.encoder_fixtures import make_tiny_clip

APP = "enc-test"
LIMITS = LimitSettings()
RESULT_TIMEOUT_S = 60
integration = pytest.mark.integration
pytestmark = pytest.mark.timeout(300)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def settings(model_dir: Path, max_batch_size: int = 8) -> EncoderSettings:
    # A 0.1 s window lets 64 concurrent callers fill whole batches on a slow CI machine.
    return EncoderSettings(
        model=str(model_dir),
        num_cpus=0.5,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=0.1,
        max_ongoing_requests=64,
    )


def deploy(model_dir: Path, max_batch_size: int = 8) -> DeploymentHandle:
    app = build_encoder_app(settings(model_dir, max_batch_size), LIMITS)
    return serve.run(app, name=APP, route_prefix=None)


def caller_message(exc: BaseException) -> str:
    """What a gateway may show: the original exception's text, never Ray's wrapper."""
    return str(getattr(exc, "cause", exc))


def stats(handle: DeploymentHandle, queue: str) -> Counter[int]:
    return Counter(handle.batch_stats.remote().result(timeout_s=RESULT_TIMEOUT_S)[queue])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip-serve"), dim=32)


@pytest.fixture(scope="module")
def local(model_dir: Path) -> ClipEncoder:
    """The same model in-process: the oracle for what the deployment returns."""
    return ClipEncoder(str(model_dir))


@pytest.fixture(scope="module")
def handle(ray_cluster: None, model_dir: Path) -> Iterator[DeploymentHandle]:
    yield deploy(model_dir)
    serve.delete(APP)


# --- unit (no Ray) -----------------------------------------------------------------------


def test_build_refuses_batches_that_could_never_fill(tmp_path: Path) -> None:
    bad = EncoderSettings(model=str(tmp_path), max_batch_size=16, max_ongoing_requests=8)
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(8\) must be >= .*\(16\)"):
        build_encoder_app(bad, LIMITS)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_batch_size": 0}, r"max_batch_size must be in \[1, 256\]"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer"),
        ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s must be in"),
        ({"max_batch_sizes": 8}, "unknown encoder user_config keys"),
    ],
)
def test_reconfigure_rejects_bad_user_config(config: dict[str, object], message: str) -> None:
    # The bare class without __init__: reconfigure only touches the batch settings.
    replica = object.__new__(EncoderDeployment.func_or_class)  # type: ignore[attr-defined]
    replica._max_batch_size, replica._batch_wait_timeout_s = 8, 0.005
    with pytest.raises((ValueError, TypeError), match=message):
        replica.reconfigure(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text is empty"),
        (" \n\t ", "text is empty"),
        (b"bytes", "text must be a string"),
        ("\ud800", "not valid Unicode"),
        ("é" * 3000, "text is 6000 bytes of UTF-8, over the limit of 4096"),
    ],
)
def test_text_validation_messages(text: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _check_text(text, LIMITS.max_text_bytes)


def bare_replica(**encoder: object) -> EncoderDeployment:
    """The deployment class without __init__ (no model), for its pure helpers."""
    replica = object.__new__(EncoderDeployment.func_or_class)  # type: ignore[attr-defined]
    replica._settings = EncoderSettings(**encoder)  # type: ignore[arg-type]
    return replica  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("defaults", "options", "expected"),
    [
        ({}, None, ("{}", "truncate")),
        (
            {"prompt_template": "a photo of {}", "long_text": "reject"},
            None,
            ("a photo of {}", "reject"),
        ),
        ({"prompt_template": "a photo of {}"}, TextOptions(), ("a photo of {}", "truncate")),
        ({"prompt_template": "a photo of {}"}, TextOptions("{}"), ("{}", "truncate")),
        ({}, TextOptions("art: {}", "sliding_window"), ("art: {}", "sliding_window")),
    ],
)
def test_request_options_override_the_settings(
    defaults: dict[str, object], options: TextOptions | None, expected: tuple[str, str]
) -> None:
    assert bare_replica(**defaults)._text_options(options) == expected


def test_bad_request_template_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="exactly once"):
        bare_replica()._text_options(TextOptions("no placeholder"))


def jpeg(size: tuple[int, int]) -> bytes:
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_reducing_gap_shrinks_what_the_replica_decodes_and_keys_its_cache(
    model_dir: Path,
) -> None:
    # Built outside an event loop, a replica opens no channel: its helpers run as in Serve.
    replicas = {
        gap: EncoderDeployment.func_or_class(  # type: ignore[attr-defined]
            EncoderSettings(model=str(model_dir), reducing_gap=gap), LIMITS
        )
        for gap in (0, 2)
    }
    data = jpeg((1024, 768))  # short side 768 >= 8 x (2 x 32): decoded at 1/8 scale
    limits = {"max_bytes": LIMITS.max_image_bytes, "max_pixels": LIMITS.max_image_pixels}
    for gap, replica in replicas.items():
        encoder = replica._encoder
        decoded = decode_image(data, **limits, min_side=encoder.min_image_side)
        assert decoded.size == ((128, 96) if gap else (1024, 768))
        _, pixels = replica._lookup_image(data)
        for got, expected in zip(pixels, encoder.prepare_image(decoded), strict=True):
            assert torch.equal(got, expected)
    key_exact, _ = replicas[0]._lookup_image(data)
    key_quick, _ = replicas[2]._lookup_image(data)
    assert key_exact != key_quick  # a cache never mixes the two preprocessings


def test_stats_count_a_running_forward_up_to_now(model_dir: Path) -> None:
    replica = EncoderDeployment.func_or_class(  # type: ignore[attr-defined]
        EncoderSettings(model=str(model_dir), concurrent_batches=2), LIMITS
    )
    entered, release = threading.Event(), threading.Event()

    def slow_forward(items: list[int]) -> np.ndarray:
        entered.set()
        release.wait(30)
        return np.zeros((len(items), 32), np.float32)

    worker = threading.Thread(target=replica._timed, args=("image", slow_forward, [1]))
    worker.start()
    try:
        assert entered.wait(30)
        time.sleep(0.05)
        running = asyncio.run(replica.stats())
    finally:
        release.set()
        worker.join(30)
    done = asyncio.run(replica.stats())
    assert running.model_slots == done.model_slots == 2
    assert 0.05 <= running.forward_seconds["image"] <= done.forward_seconds["image"]
    assert running.forward_seconds["text"] == done.forward_seconds["text"] == 0.0


# --- integration -------------------------------------------------------------------------


@integration
def test_info_describes_the_model(handle: DeploymentHandle, model_dir: Path) -> None:
    info = handle.info.remote().result(timeout_s=RESULT_TIMEOUT_S)
    assert info == {"model_id": str(model_dir), "dim": 32, "max_text_tokens": 16}


@integration
def test_text_vectors_equal_in_process_encoding(
    handle: DeploymentHandle, local: ClipEncoder
) -> None:
    texts = ["the cat", "a dog on a beach", "x", "the cat sat on the mat " * 20]
    # Sent together, so they share server-side batches: batching must not change vectors.
    responses = [handle.encode_text.remote(text) for text in texts]
    served = np.stack([r.result(timeout_s=RESULT_TIMEOUT_S) for r in responses])
    assert served.dtype == np.float32 and served.shape == (4, 32)
    expected = np.concatenate([local.encode_texts([text]) for text in texts])
    np.testing.assert_allclose(served, expected, atol=1e-5)


@integration
def test_image_vectors_equal_in_process_encoding(
    handle: DeploymentHandle, local: ClipEncoder
) -> None:
    images = [png((200, 20, 20)), png((20, 200, 20), (64, 64)), png((20, 20, 200), (1, 1))]
    responses = [handle.encode_image.remote(data) for data in images]
    served = np.stack([r.result(timeout_s=RESULT_TIMEOUT_S) for r in responses])
    pixels = [
        local.prepare_image(decode_image(data, max_bytes=10**7, max_pixels=10**7))
        for data in images
    ]
    np.testing.assert_allclose(served, local.encode_pixels(pixels), atol=1e-5)


@integration
def test_bad_image_is_invalid_argument_and_harms_no_one(handle: DeploymentHandle) -> None:
    good = [handle.encode_image.remote(png((i * 30, 0, 0))) for i in range(7)]
    bad = handle.encode_image.remote(b"definitely not an image")
    with pytest.raises(InvalidArgument) as caught:
        bad.result(timeout_s=RESULT_TIMEOUT_S)
    # The caller-safe message is on `.cause`; str(exc) is Ray's dump (actor, pid, paths).
    assert isinstance(getattr(caught.value, "cause", None), InvalidArgument)
    assert caller_message(caught.value).startswith("not an image")
    assert "ray::ServeReplica" in str(caught.value)
    # The images that shared the moment (and would have shared a batch) all succeeded.
    assert all(r.result(timeout_s=RESULT_TIMEOUT_S).shape == (32,) for r in good)
    assert handle.encode_text.remote("still serving").result(timeout_s=RESULT_TIMEOUT_S).shape == (
        32,
    )


@integration
@pytest.mark.parametrize(
    ("method", "payload", "message"),
    [
        ("encode_text", "   ", "text is empty"),
        ("encode_image", b"", "image is empty"),
        ("encode_image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated or corrupt"),
    ],
)
def test_invalid_inputs_reach_the_caller_as_invalid_argument(
    handle: DeploymentHandle, method: str, payload: object, message: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        getattr(handle, method).remote(payload).result(timeout_s=RESULT_TIMEOUT_S)
    assert message in caller_message(caught.value)


@integration
async def test_awaiting_caller_catches_invalid_argument(handle: DeploymentHandle) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await handle.encode_text.remote("")
    assert caller_message(caught.value) == "text is empty or only whitespace"
    vectors = await asyncio.gather(*[handle.encode_text.remote(f"t{i}") for i in range(8)])
    assert all(v.shape == (32,) for v in vectors)


@integration
@pytest.mark.parametrize("queue", ["text", "image"])
def test_64_concurrent_callers_fill_batches_of_8(handle: DeploymentHandle, queue: str) -> None:
    before = stats(handle, queue)
    if queue == "text":
        responses = [handle.encode_text.remote(f"caller {i}") for i in range(64)]
    else:
        # Colours no other test encodes: a cache hit would skip the batch queue.
        responses = [handle.encode_image.remote(png((i, 2 * i, 255 - i))) for i in range(64)]
    assert all(r.result(timeout_s=RESULT_TIMEOUT_S).shape == (32,) for r in responses)
    sizes = stats(handle, queue) - before
    assert sum(size * count for size, count in sizes.items()) == 64
    assert max(sizes) == 8
    assert sizes[8] * 8 >= 32, sizes  # at least half of the items rode in full batches


@integration
def test_cancelled_callers_do_not_stall_the_queue(handle: DeploymentHandle) -> None:
    responses = [handle.encode_text.remote(f"maybe cancelled {i}") for i in range(32)]
    for response in responses[::2]:
        response.cancel()
    for response in responses[1::2]:
        assert response.result(timeout_s=RESULT_TIMEOUT_S).shape == (32,)
    for response in responses[::2]:  # each either finished first or reports cancellation
        try:
            response.result(timeout_s=RESULT_TIMEOUT_S)
        except (CancelledError, TaskCancelledError, asyncio.CancelledError):
            pass
    follow_up = [handle.encode_text.remote(f"after {i}") for i in range(16)]
    assert all(r.result(timeout_s=RESULT_TIMEOUT_S).shape == (32,) for r in follow_up)


@integration
def test_user_config_overrides_the_batch_limit(handle: DeploymentHandle, model_dir: Path) -> None:
    # Settings say 8; the user_config passed to .options says 4: reconfigure() must win.
    # An imperative serve.run always restarts the replica in Ray 2.60 (it draws a random
    # code version; `version=` is no longer public), so this checks reconfigure() at start.
    app = EncoderDeployment.options(  # type: ignore[attr-defined]
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0.5},
        user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.1},
    ).bind(settings(model_dir, max_batch_size=8), LIMITS)
    smaller = serve.run(app, name=APP, route_prefix=None)
    try:
        before = stats(smaller, "text")
        responses = [smaller.encode_text.remote(f"caller {i}") for i in range(64)]
        assert all(r.result(timeout_s=RESULT_TIMEOUT_S).shape == (32,) for r in responses)
        sizes = stats(smaller, "text") - before
        assert max(sizes) == 4, sizes
        assert sizes[4] * 4 >= 32, sizes
    finally:
        deploy(model_dir, max_batch_size=8)  # later tests share the module's deployment


@integration
def test_text_options_change_what_is_embedded(handle: DeploymentHandle, local: ClipEncoder) -> None:
    long = " ".join(f"word{i} the cat" for i in range(30))
    cases = [
        ("cat", TextOptions("a photo of {}"), local.encode_texts(["a photo of cat"])[0]),
        (
            long,
            TextOptions(long_text="sliding_window"),
            local.encode_texts([long], "sliding_window")[0],
        ),
        (long, None, local.encode_texts([long])[0]),
    ]
    responses = [handle.encode_text.remote(text, options) for text, options, _ in cases]
    for response, (_, _, expected) in zip(responses, cases, strict=True):
        np.testing.assert_allclose(response.result(timeout_s=RESULT_TIMEOUT_S), expected, atol=1e-5)
    with pytest.raises(InvalidArgument) as caught:
        handle.encode_text.remote(long, TextOptions(long_text="reject")).result(
            timeout_s=RESULT_TIMEOUT_S
        )
    assert "over the model's context of 16" in caller_message(caught.value)


@integration
def test_repeated_inputs_are_served_from_the_cache(handle: DeploymentHandle) -> None:
    def counters() -> dict[str, int]:
        return dict(handle.stats.remote().result(timeout_s=RESULT_TIMEOUT_S).cache)

    image = png((1, 2, 3), (33, 17))
    before = counters()
    first_text = handle.encode_text.remote("cache me").result(timeout_s=RESULT_TIMEOUT_S)
    first_image = handle.encode_image.remote(image).result(timeout_s=RESULT_TIMEOUT_S)
    batches = sum(stats(handle, "text").values()) + sum(stats(handle, "image").values())
    again_text = handle.encode_text.remote("cache me").result(timeout_s=RESULT_TIMEOUT_S)
    again_image = handle.encode_image.remote(image).result(timeout_s=RESULT_TIMEOUT_S)
    # Same text under another template is another input: a miss.
    handle.encode_text.remote("cache me", TextOptions("a {}")).result(timeout_s=RESULT_TIMEOUT_S)
    after = counters()
    np.testing.assert_array_equal(first_text, again_text)
    np.testing.assert_array_equal(first_image, again_image)
    assert after["hits"] - before["hits"] == 2
    assert after["misses"] - before["misses"] == 3
    assert after["entries"] - before["entries"] == 3
    assert 0 < after["bytes"] <= after["capacity_bytes"]
    # The hits never reached the model: one new batch, for the templated text only.
    assert sum(stats(handle, "text").values()) + sum(stats(handle, "image").values()) == batches + 1


@integration
def test_stats_describe_model_batches_and_cache(handle: DeploymentHandle, model_dir: Path) -> None:
    handle.encode_text.remote("for the histogram").result(timeout_s=RESULT_TIMEOUT_S)
    got = handle.stats.remote().result(timeout_s=RESULT_TIMEOUT_S)
    assert isinstance(got, EncoderStats)
    assert (got.model_id, got.dim, got.normalized) == (str(model_dir), 32, True)
    assert (got.device, got.dtype, got.context_length, got.image_size) == ("cpu", "fp32", 16, 32)
    assert got.replicas == 1
    assert sum(got.batch_sizes["text"].values()) >= 1
    assert set(got.cache) == {"hits", "misses", "entries", "bytes", "capacity_bytes"}
    assert got.model_slots >= 1
    assert got.forward_seconds["text"] > 0
    # One replica's counters are the total: no stats board actor (a process) is started.
    handle.check_health.remote().result(timeout_s=RESULT_TIMEOUT_S)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith(f"clipsearch-stats:{APP}:")], names


@integration
def test_phase_times_account_for_each_embedded_item(handle: DeploymentHandle) -> None:
    before = len(handle.phase_times.remote("image").result(timeout_s=RESULT_TIMEOUT_S))
    handle.encode_image.remote(png((7, 77, 177))).result(timeout_s=RESULT_TIMEOUT_S)
    handle.encode_text.remote("where did the time go").result(timeout_s=RESULT_TIMEOUT_S)
    images = handle.phase_times.remote("image").result(timeout_s=RESULT_TIMEOUT_S)
    texts = handle.phase_times.remote("text").result(timeout_s=RESULT_TIMEOUT_S)
    assert len(images) == min(before + 1, RECENT)
    for times in (images[-1], texts[-1]):
        assert times.batch_size == 1
        assert times.forward_s > 0
        assert min(times.prepare_s, times.queue_s, times.return_s) >= 0
        assert times.total_s >= times.forward_s


@integration
def test_stats_add_each_forward_to_its_queue(handle: DeploymentHandle) -> None:
    def busy() -> EncoderStats:
        reading: EncoderStats = handle.stats.remote().result(timeout_s=RESULT_TIMEOUT_S)
        return reading

    def last_forward(queue: str) -> float:
        times = handle.phase_times.remote(queue).result(timeout_s=RESULT_TIMEOUT_S)
        return float(times[-1].forward_s)

    before = busy()
    handle.encode_text.remote("how busy was the model").result(timeout_s=RESULT_TIMEOUT_S)
    after_text = busy()
    handle.encode_image.remote(png((9, 99, 199))).result(timeout_s=RESULT_TIMEOUT_S)
    after_image = busy()
    text_s = after_text.forward_seconds["text"] - before.forward_seconds["text"]
    assert text_s == pytest.approx(last_forward("text"), abs=0.005)
    assert after_text.forward_seconds["image"] == before.forward_seconds["image"]
    image_s = after_image.forward_seconds["image"] - after_text.forward_seconds["image"]
    assert image_s == pytest.approx(last_forward("image"), abs=0.005)
    assert after_image.model_slots == before.model_slots >= 1


def test_phase_log_keeps_the_latest_records_per_queue() -> None:
    log = PhaseLog(("text", "image"), keep=3)
    for n in range(5):
        log.add("text", PhaseTimes(0.0, 0.0, float(n), 0.0, 1))
    assert [t.forward_s for t in log.recent("text")] == [2.0, 3.0, 4.0]
    assert log.recent("image") == []


def test_replica_env_sets_libgomps_wait_policy_from_settings() -> None:
    # A short bounded spin by default; ACTIVE, so libgomp's throttled count (used once a
    # process holds more OpenMP threads than cores) is min(1000, N), not ~100.
    assert replica_env(EncoderSettings()) == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "GOMP_SPINCOUNT": "3000",
    }
    assert replica_env(EncoderSettings(omp_spin_count=50_000))["GOMP_SPINCOUNT"] == "50000"
    # 0: sleep at once. No GOMP_SPINCOUNT, which would override PASSIVE's zero spin.
    assert replica_env(EncoderSettings(omp_spin_count=0)) == {"OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="omp_spin_count"):
        EncoderSettings(omp_spin_count=-1)


def test_default_torch_threads_share_the_cores_among_replicas() -> None:
    cores = len(os.sched_getaffinity(0))
    assert default_torch_threads(1) == cores  # not Ray's OMP_NUM_THREADS=num_cpus (1)
    assert default_torch_threads(cores * 4) == 1
