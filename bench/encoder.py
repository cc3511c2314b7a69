"""The served encoder vs the raw model, measured side by side in one run.

Builds a randomly initialised ViT-B/32 CLIP (`CLIPConfig()` defaults: the real shapes and
compute) in a temporary directory, with the bundled demo tokenizer, and loads it through
the same `from_pretrained` path as any checkpoint. For each precision it then measures, on
this machine and in this run:

  image thr.  served EncodeImage through the gRPC gateway at concurrency 16 (one image per
              call; decode + preprocess included) / raw get_image_features at batch B.
              Served figures are steady state: a closed loop, warmed up, then 16 / mean
              latency over a window of --seconds (see `served_throughput`); the detail
              line also gives them counted from a cold start, as before 2026-11-29
  text thr.   the same for 16-token captions / raw get_text_features at batch B
  batching    served at max_batch_size B / served at max_batch_size 1 (both at conc. 16)
  low load    p50 of one call at a time minus the raw batch-1 forward, against the budget
              batch_wait_timeout_s + 3 ms
  reach       raw at batch B / served at max_batch_size 1: what batching would read if
              served ran exactly as fast as raw (batching = thr. ratio x reach); when
              batching misses its target with a thr. ratio near 1, the reach is what limits it
  cosine      min cosine of the served vectors to raw fp32 get_*_features on the same inputs
  slots busy  in the steady window of the best served run at batch B, the share of the model
              slots' time spent in forwards (the replica's stats: forward_seconds, model_slots;
              one replica, so they are its own, read live): below 100 %,
              the slots waited for work (callers' round trips through the gateway); near
              100 % with thr. below 1, the forwards themselves ran slower than raw

A second table splits the low-load p50 into its parts, all from the same low-load calls:
the replica's own record of each call (`EncoderDeployment.phase_times`: prepare = hash +
decode + preprocess for images, tokenise for text; queue = batch wait + hop to the model
thread; forward; return hop), the same kind of calls made straight over the replica's
direct channel (encoder_service.channel, what the gateway uses) and straight on the Serve
handle, and decode and preprocess of one image timed in this process. Channel hop / handle
overhead = median over such calls of (call latency - the replica's total for that call);
gateway + gRPC = the same median over gRPC calls minus the hop the gateway used (the
channel's, or with `--channel off` the handle's). The gRPC client runs in the gateway's
process and event loop, so its own work counts as gateway here. The gateway's health
canary is turned off (it would put a text forward every 5 s into the measurements).

Usage: PYTHONPATH=. python bench/encoder.py [--dtypes fp32,bf16,int8] [--batch 8]
         [--threads N] [--omp-spin N] [--slots N] [--seconds 5] [--rounds 2] [--channel on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and bench/gateway.py would
# shadow the `gateway` package: drop the folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from clipsearch.launcher import init_ray  # noqa: E402
from clipsearch.settings import EncoderSettings, load_settings  # noqa: E402
from clipsearch.v1 import encoder_pb2, encoder_pb2_grpc  # noqa: E402
from encoder_service.channel import pack_text  # noqa: E402
from encoder_service.images import decode_image  # noqa: E402
from encoder_service.model import resolve_model  # noqa: E402
from encoder_service.preprocess import for_processor  # noqa: E402

CONCURRENCY = 16
CAPTION_TOKENS = 16
WORDS = "a the red blue green small large circle square star on of and with".split()


def build_vit_b32(directory: Path, seed: int = 0) -> Path:
    """A random-init ViT-B/32 checkpoint (+ demo tokenizer, CLIP processor) in `directory`."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("demo"))
    tokenizer.model_max_length = 77
    config = CLIPConfig()
    # Only the special-token ids follow the tokenizer (CLIP pools at the EOS token).
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)
    return directory


def captions(tokenizer: Any, n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions of exactly CAPTION_TOKENS tokens (special tokens included)."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    while len(out) < n:
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < CAPTION_TOKENS:
            words.append(str(rng.choice(WORDS)))
        if len(tokenizer(" ".join(words))["input_ids"]) == CAPTION_TOKENS:
            out.add(" ".join(words))
    return sorted(out)


def jpegs(n: int, seed: int = 0) -> list[bytes]:
    """`n` distinct 320x240 JPEGs of smooth random colour fields (photo-like sizes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# --- the raw model ------------------------------------------------------------------------


class Raw:
    """transformers' own model in this process: the yardstick."""

    def __init__(self, directory: Path, dtype: str) -> None:
        torch_dtype = {"bf16": torch.bfloat16}.get(dtype, torch.float32)
        self.model = CLIPModel.from_pretrained(directory, dtype=torch_dtype).eval()
        if dtype == "int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization import quantize_dynamic

                self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.dtype = torch_dtype
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.processor = CLIPImageProcessorPil.from_pretrained(directory)

    def pixels(self, images: list[bytes]) -> torch.Tensor:
        decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        return self.processor(images=decoded, return_tensors="pt")["pixel_values"].to(self.dtype)

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding="longest", return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> np.ndarray:
        return _unit(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def text_features(self, tokens: dict[str, torch.Tensor]) -> np.ndarray:
        return _unit(self.model.get_text_features(**tokens))


def _unit(output: Any) -> np.ndarray:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1).numpy()


def raw_throughput(fn: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of repeated `fn()` calls that each process `items` items."""
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * items / (time.perf_counter() - start)


def raw_latency(fn: Callable[[], object], n: int = 15) -> float:
    """Median seconds of one call."""
    fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# --- the served path ----------------------------------------------------------------------


@dataclass
class Served:
    """The encoder deployment behind a real grpc.aio gateway, and a client channel to it."""

    stub: encoder_pb2_grpc.EncoderServiceStub
    channel: grpc.aio.Channel
    server: Any
    handle: Any
    encoder: Any  # the gateway's RayEncoder

    async def image(self, data: bytes) -> np.ndarray:
        reply = await self.stub.EncodeImage(encoder_pb2.EncodeImageRequest(images=[data]))
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)

    async def text(self, text: str) -> np.ndarray:
        reply = await self.stub.EncodeText(encoder_pb2.EncodeTextRequest(texts=[text]))
        return np.asarray(reply.embeddings[0].values, dtype=np.float32)

    async def handle_image(self, data: bytes) -> np.ndarray:
        return await self.handle.encode_image.remote(data)  # type: ignore[no-any-return]

    async def handle_text(self, text: str) -> np.ndarray:
        return await self.handle.encode_text.remote(text)  # type: ignore[no-any-return]

    async def channel_image(self, data: bytes) -> np.ndarray:
        return await self._over_channel("image", data)

    async def channel_text(self, text: str) -> np.ndarray:
        return await self._over_channel("text", pack_text(text, None))

    async def _over_channel(self, kind: str, item: Any) -> np.ndarray:
        channel = self.encoder.channels.pick()
        if channel is None:
            raise RuntimeError("no encoder channel open")
        (answer,) = await channel.call(kind, [item])
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]


def encoder_settings(
    directory: Path, dtype: str, batch: int, threads: int, omp_spin: int, slots: int = 0
) -> dict[str, Any]:
    return {
        "concurrent_batches": slots,
        "model": str(directory),
        "dtype": dtype,
        "torch_threads": threads,
        "max_batch_size": batch,
        "omp_spin_count": omp_spin,
        "cache_bytes": 0,  # every call must reach the model
    }


async def start_served(settings: Any, use_channel: bool) -> Served:
    from ray import serve

    from encoder_service.deployment import build_encoder_app
    from gateway.backends import RayEncoder
    from gateway.coordinator import Coordinator
    from gateway.server import create_server

    app = build_encoder_app(settings.encoder, settings.limits)
    handle = await asyncio.to_thread(serve.run, app, name="bench-encoder", route_prefix=None)
    info = await handle.info.remote()
    encoder = RayEncoder(handle, info["model_id"], info["dim"])
    if not await encoder.connect():
        raise RuntimeError("the encoder's direct channel did not open")
    encoder.use_channel = use_channel
    coordinator = Coordinator(encoder, [])
    server, port, _ = await create_server(coordinator, settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Served(encoder_pb2_grpc.EncoderServiceStub(channel), channel, server, handle, encoder)


async def set_batch(settings: Any, batch: int) -> None:
    """Redeploy with another max_batch_size (an imperative serve.run restarts the replica)."""
    from ray import serve

    from encoder_service.deployment import build_encoder_app

    encoder = settings.encoder.model_copy(update={"max_batch_size": batch})
    app = build_encoder_app(encoder, settings.limits)
    await asyncio.to_thread(serve.run, app, name="bench-encoder", route_prefix=None)


@dataclass
class Throughput:
    """One closed-loop served run (see `served_throughput`)."""

    steady: float  # calls/s in steady state: CONCURRENCY / mean latency of the window's calls
    cold: float  # calls/s counted from the first send to the last answer, start-up included


async def served_throughput(
    call: Callable[[Any], Awaitable[object]],
    inputs: list[Any],
    seconds: float,
    warmup_s: float,
) -> Throughput:
    """CONCURRENCY callers, each sending one input at a time, without pause, for `warmup_s`
    and then `seconds`.

    The steady figure is Little's law over the calls sent in that window: with N callers
    that never pause, calls/s = N / mean latency. Counting answers in a window instead is
    off by up to a batch (8 answers arrive together) at each end. The warm-up matters:
    callers that start together are a burst, and a burst's first batches are small and
    slow (the first request runs alone, the rest wait for its forward and for each other's
    preprocessing), about 1 s of fp32 image batches here. The cold figure includes that
    start and the ramp-down at the end, as this bench counted until 2026-11-29.
    """
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + seconds)
    latencies: list[float] = []
    done = 0

    async def worker(offset: int) -> None:
        nonlocal done
        index = offset
        while (sent := time.perf_counter()) < window[1]:
            await call(inputs[index % len(inputs)])
            if sent >= window[0]:
                latencies.append(time.perf_counter() - sent)
            index += CONCURRENCY
            done += 1

    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    cold = done / (time.perf_counter() - start)
    return Throughput(CONCURRENCY / statistics.fmean(latencies), cold)


async def served_latency(
    call: Callable[[Any], Awaitable[object]], inputs: list[Any]
) -> list[float]:
    """Seconds of each call, one at a time (the first input is a warm-up, not counted)."""
    await call(inputs[0])
    samples = []
    for item in inputs[1:]:
        start = time.perf_counter()
        await call(item)
        samples.append(time.perf_counter() - start)
    return samples


async def replica_split(served: Served, queue: str, samples: list[float]) -> dict[str, float]:
    """Medians of the replica's phase times over the items of the last `samples` calls, and
    the median of each call's time outside the replica (its latency minus the replica's
    total for that very call: the forward's own noise cancels out)."""
    times = (await served.handle.phase_times.remote(queue))[-len(samples) :]
    split = {
        phase: statistics.median(getattr(t, phase) for t in times)
        for phase in ("prepare_s", "queue_s", "forward_s", "return_s", "total_s")
    }
    split["outside_s"] = statistics.median(
        s - t.total_s for s, t in zip(samples, times, strict=True)
    )
    split["batch_size"] = max(t.batch_size for t in times)
    return split


def intake_seconds(raw: Raw, images: list[bytes]) -> tuple[float, float]:
    """Median seconds to decode one image (the served checks included) and to preprocess it
    (as the replica does: the fast CLIP path, else the processor)."""
    fast = for_processor(raw.processor)
    decode, preprocess = [], []
    for data in images:
        start = time.perf_counter()
        image = decode_image(data, max_bytes=1 << 26, max_pixels=1 << 26)
        middle = time.perf_counter()
        if fast is not None:
            fast(image)
        else:
            raw.processor(images=[image], return_tensors="pt")
        decode.append(middle - start)
        preprocess.append(time.perf_counter() - middle)
    return statistics.median(decode), statistics.median(preprocess)


# --- one precision ------------------------------------------------------------------------


@dataclass
class Row:
    dtype: str
    figures: dict[str, float]
    split: dict[str, dict[str, float]]  # "img" / "txt" -> low-load parts (seconds)


async def measure(
    directory: Path, dtype: str, args: argparse.Namespace, oracle: dict[str, np.ndarray]
) -> Row:
    """Every figure for one precision. Raw and served runs alternate, `args.rounds` times,
    and each keeps its best round, so a noisy neighbour on a shared machine skews neither."""
    images = jpegs(96, seed=1)
    raw = Raw(directory, dtype)
    texts = captions(raw.tokenizer, 128, seed=1)
    torch.set_num_threads(args.threads)
    b, sec = args.batch, args.seconds
    pixels_b, tokens_b = raw.pixels(images[:b]), raw.tokens(texts[:b])
    pixels_1, tokens_1 = raw.pixels(images[:1]), raw.tokens(texts[:1])
    settings = load_settings(
        gateway={"port": 0, "health_interval_s": 3600.0},
        demo_corpus=0,
        encoder=encoder_settings(directory, dtype, b, args.threads, args.omp_spin, args.slots),
    )
    served = await start_served(settings, args.channel == "on")
    f: dict[str, float] = {}
    split: dict[str, dict[str, float]] = {}

    def best(name: str, value: float, smaller: bool = False) -> bool:
        old = f.get(name)
        f[name] = value if old is None else (min if smaller else max)(old, value)
        return f[name] == value

    async def low_load(kind: str, inputs: list[Any], via_handle: list[Any]) -> None:
        """Low-load p50 through gRPC and its split; the round with the best p50 is kept.
        The direct calls (channel, handle) take `via_handle`'s halves."""
        grpc_call, handle_call, channel_call = (
            (served.image, served.handle_image, served.channel_image)
            if kind == "img"
            else (served.text, served.handle_text, served.channel_text)
        )
        queue = "image" if kind == "img" else "text"
        samples = await served_latency(grpc_call, inputs)
        parts = await replica_split(served, queue, samples)
        half = len(via_handle) // 2
        for name, call, items in (
            ("handle", handle_call, via_handle[:half]),
            ("channel", channel_call, via_handle[half:]),
        ):
            via = await served_latency(call, items)
            parts[f"{name}_p50"] = statistics.median(via)
            parts[f"{name}_outside_s"] = (await replica_split(served, queue, via))["outside_s"]
        hop = "channel" if served.encoder.use_channel else "handle"
        parts["gateway_s"] = parts["outside_s"] - parts[f"{hop}_outside_s"]
        parts["grpc_p50"] = statistics.median(samples)
        if best(f"lat_{kind}", parts["grpc_p50"], True):
            split[kind] = parts

    async def loaded(kind: str, inputs: list[Any], seconds: float, batch: int) -> None:
        """Served throughput (steady and cold) at `batch`; at batch B also how busy the
        model slots were in the steady window. Each figure kept from its best round."""
        queue = "image" if kind == "img" else "text"
        call = served.image if kind == "img" else served.text
        warmup = max(1.0, seconds / 2)  # unmeasured, so the window is steady
        run = asyncio.ensure_future(served_throughput(call, inputs, seconds, warmup))
        readings = []
        if batch > 1:  # read the model's busy time at both ends of the steady window
            for edge in (warmup, seconds):
                await asyncio.sleep(edge)
                readings.append((await served.handle.stats.remote(), time.monotonic()))
        got = await run
        suffix = "" if batch > 1 else "_1"
        best(f"srv_{kind}_cold{suffix}", got.cold)
        if best(f"srv_{kind}{suffix}", got.steady) and readings:
            (before, t0), (after, t1) = readings
            busy = after.forward_seconds[queue] - before.forward_seconds[queue]
            f[f"busy_{kind}"] = busy / ((t1 - t0) * after.model_slots)

    try:
        for _ in range(args.rounds):
            best("raw_img", raw_throughput(lambda: raw.image_features(pixels_b), b, sec))
            await loaded("img", images, sec, b)
            best("raw_txt", raw_throughput(lambda: raw.text_features(tokens_b), b, sec / 2))
            await loaded("txt", texts, sec / 2, b)
            best("raw_img_1", raw_latency(lambda: raw.image_features(pixels_1)), True)
            await low_load("img", images[:21], images[21:63])
            best("raw_txt_1", raw_latency(lambda: raw.text_features(tokens_1)), True)
            await low_load("txt", texts[:31], texts[31:93])
            decode_s, preprocess_s = intake_seconds(raw, images[:21])
            best("decode_1", decode_s, True)
            best("preprocess_1", preprocess_s, True)
        stats = await served.handle.batch_stats.remote()
        f["max_batch_img"] = max(stats["image"])
        f["max_batch_txt"] = max(stats["text"])
        got_img = np.stack([await served.image(x) for x in images[: len(oracle["image"])]])
        got_txt = np.stack([await served.text(x) for x in texts[: len(oracle["text"])]])
        f["cos_img"] = float(np.min(np.sum(got_img * oracle["image"], axis=1)))
        f["cos_txt"] = float(np.min(np.sum(got_txt * oracle["text"], axis=1)))
        await set_batch(settings, 1)
        if served.encoder.use_channel:  # the restarted replica's channel, at once
            await served.encoder.connect()
        for _ in range(args.rounds):
            await loaded("img", images, sec, 1)
            await loaded("txt", texts, sec / 2, 1)
    finally:
        await served.channel.close()
        await served.server.stop(0)
        from ray import serve

        await asyncio.to_thread(serve.delete, "bench-encoder")
    f["wait_ms"] = settings.encoder.batch_wait_timeout_s * 1000
    return Row(dtype, f, split)


def fp32_oracle(directory: Path) -> dict[str, np.ndarray]:
    """Raw fp32 embeddings of the first inputs each run uses: the cosine reference."""
    raw = Raw(directory, "fp32")
    images, texts = jpegs(96, seed=1)[:8], captions(raw.tokenizer, 128, seed=1)[:8]
    return {
        "image": raw.image_features(raw.pixels(images)),
        "text": raw.text_features(raw.tokens(texts)),
    }


def table(rows: list[Row], batch: int) -> str:
    head = (
        "| dtype | image thr. served/raw (≥0.90) | text thr. served/raw (≥0.85) "
        "| batching images (≥1.3×) | batching text (≥2.5×) "
        "| low-load p50 − raw, image / text (budget) | cosine to fp32 image / text |"
    )
    lines = [head, "|" + "---|" * 7]
    for row in rows:
        f = row.figures
        budget = f["wait_ms"] + 3
        lines.append(
            f"| {row.dtype} "
            f"| {f['srv_img'] / f['raw_img']:.2f} ({f['srv_img']:.1f} / {f['raw_img']:.1f} img/s) "
            f"| {f['srv_txt'] / f['raw_txt']:.2f} ({f['srv_txt']:.0f} / {f['raw_txt']:.0f} /s) "
            f"| {f['srv_img'] / f['srv_img_1']:.2f}× (batch ≤{f['max_batch_img']:.0f}) "
            f"| {f['srv_txt'] / f['srv_txt_1']:.2f}× (batch ≤{f['max_batch_txt']:.0f}) "
            f"| {(f['lat_img'] - f['raw_img_1']) * 1000:.1f} / "
            f"{(f['lat_txt'] - f['raw_txt_1']) * 1000:.1f} ms ({budget:.0f} ms) "
            f"| {f['cos_img']:.5f} / {f['cos_txt']:.5f} |"
        )
    lines.append(
        f"\nraw = transformers get_*_features in-process at batch {batch}; served = gRPC "
        f"gateway → Ray Serve, concurrency {CONCURRENCY}, one item per call."
    )
    for row in rows:
        f = row.figures
        lines.append(
            f"{row.dtype}: raw batch-1 forward image {f['raw_img_1'] * 1000:.1f} ms, text "
            f"{f['raw_txt_1'] * 1000:.1f} ms; served p50 image {f['lat_img'] * 1000:.1f} ms, "
            f"text {f['lat_txt'] * 1000:.1f} ms; served max_batch_size 1: "
            f"{f['srv_img_1']:.1f} img/s, {f['srv_txt_1']:.0f} texts/s; batching reach "
            f"image {f['raw_img'] / f['srv_img_1']:.2f}×, "
            f"text {f['raw_txt'] / f['srv_txt_1']:.2f}×; "
            f"model slots busy during served thr. image {f['busy_img']:.0%}, "
            f"text {f['busy_txt']:.0%}; counted from a cold start (start-up and ramp-down "
            f"in): thr. image {f['srv_img_cold'] / f['raw_img']:.2f}, "
            f"text {f['srv_txt_cold'] / f['raw_txt']:.2f}, batching "
            f"{f['srv_img_cold'] / f['srv_img_cold_1']:.2f}× / "
            f"{f['srv_txt_cold'] / f['srv_txt_cold_1']:.2f}×"
        )
    return "\n".join(lines)


def split_table(rows: list[Row]) -> str:
    """The low-load p50 taken apart, in ms (see the module docstring)."""
    lines = [
        "| dtype, input | gRPC p50 | channel p50 | handle p50 | replica total | prepare "
        "| queue wait | forward in replica / raw | return hop | channel hop | handle overhead "
        "| gateway + gRPC |",
        "|" + "---|" * 12,
    ]
    for row in rows:
        f = row.figures
        for kind, raw_key, name in (("img", "raw_img_1", "image"), ("txt", "raw_txt_1", "text")):
            p = {k: v * 1000 for k, v in row.split[kind].items() if k != "batch_size"}
            prepare = f"{p['prepare_s']:.1f}"
            if kind == "img":
                prepare += (
                    f" (decode {f['decode_1'] * 1000:.1f} + pre {f['preprocess_1'] * 1000:.1f})"
                )
            lines.append(
                f"| {row.dtype}, {name} | {p['grpc_p50']:.1f} | {p['channel_p50']:.1f} "
                f"| {p['handle_p50']:.1f} | {p['total_s']:.1f} | {prepare} | {p['queue_s']:.1f} "
                f"| {p['forward_s']:.1f} / {f[raw_key] * 1000:.1f} | {p['return_s']:.1f} "
                f"| {p['channel_outside_s']:.1f} | {p['handle_outside_s']:.1f} "
                f"| {p['gateway_s']:.1f} |"
            )
    return "\n".join(lines)


def measure_here(args: argparse.Namespace) -> list[Row]:
    """Every precision of `args.dtypes` in this process, on a Ray cluster of its own."""
    settings = load_settings(demo_corpus=0)
    ray_temp = init_ray(settings)
    try:
        return asyncio.run(run(args))
    finally:
        import ray

        ray.shutdown()
        if ray_temp:
            shutil.rmtree(ray_temp, ignore_errors=True)


async def run(args: argparse.Namespace) -> list[Row]:
    from ray import serve

    serve.start(proxy_location="Disabled")
    directory = Path(tempfile.mkdtemp(prefix="vitb32-"))
    try:
        build_vit_b32(directory)
        torch.set_num_threads(args.threads)
        oracle = fp32_oracle(directory)
        rows = []
        for dtype in args.dtypes.split(","):
            rows.append(await measure(directory, dtype, args, oracle))
            print(table(rows[-1:], args.batch).splitlines()[2], flush=True)
            print(split_table(rows[-1:]), flush=True)
        return rows
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def in_children(args: argparse.Namespace) -> list[Row]:
    """Each precision in a process of its own. Measured in one process after fp32, raw bf16
    ran 15-25x slower (a 1.4 s batch-1 image forward; 5 img/s against 49 in a process of its
    own) while the replica's bf16 was normal: the raw side must not inherit that state."""
    rows = []
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "row.json"
            options = [
                f"--{name.replace('_', '-')}={getattr(args, name)}"
                for name in ("batch", "threads", "omp_spin", "slots")
            ]
            options += [f"--seconds={args.seconds}", f"--rounds={args.rounds}"]
            options += [f"--channel={args.channel}"]
            command = [sys.executable, os.path.abspath(__file__), f"--dtypes={dtype}", *options]
            subprocess.run([*command, f"--json={out}"], check=True)
            rows.append(Row(**json.loads(out.read_text())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16,int8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--omp-spin",
        type=int,
        default=EncoderSettings().omp_spin_count,
        help="the replica's encoder.omp_spin_count (0 = OMP_WAIT_POLICY=PASSIVE); the raw "
        "side keeps libgomp's defaults",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=EncoderSettings().concurrent_batches,
        help="the replica's encoder.concurrent_batches (0 = auto: 2 on a 2-core CPU)",
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--channel",
        choices=("on", "off"),
        default="on",
        help="off: the gateway calls the Serve handle only (the path before the channel)",
    )
    parser.add_argument("--json", help="write the row here (one dtype; used by the parent)")
    args = parser.parse_args()
    if "," in args.dtypes:
        rows = in_children(args)
    else:
        rows = measure_here(args)
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(rows[0])))
        return
    print()
    print(table(rows, args.batch))
    print(
        f"replica encoder.omp_spin_count {args.omp_spin} (0 = OMP_WAIT_POLICY=PASSIVE), "
        f"encoder.concurrent_batches {args.slots} (0 = auto)"
    )
    print()
    print(split_table(rows))


if __name__ == "__main__":
    main()
