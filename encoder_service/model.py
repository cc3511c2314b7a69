"""The model wrapper: a CLIP-style checkpoint in, L2-normalised float32 embeddings out.

Pure library code (no Ray, no gRPC). Works with any checkpoint that transformers' Auto
classes load into a model with `get_text_features` / `get_image_features` (CLIPModel,
SiglipModel, ...), from a hub id or a local directory.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import clipsearch
from clipsearch.settings import DEMO_MODEL
from encoder_service.preprocess import for_processor
from encoder_service.text import LongText, TextTokenizer

DEMO_MODEL_ID = "clipsearch-demo"
"""The `model_id` reported for the bundled demo model."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
# SigLIP pools the last token and was trained on texts padded to the full context, so its
# embeddings change with the padding; CLIP pools at EOS under a causal mask, so padding to
# the longest text in the batch gives the same vectors 4-5x faster.
_PAD_TO_CONTEXT_MODEL_TYPES = frozenset({"siglip", "siglip2"})
# Shortest-edge resizing of a 1x10000 strip would build a 224x2,240,000 intermediate;
# cropping the centre to this aspect first keeps the result and bounds the memory.
_MAX_ASPECT_BEFORE_CROP = 2.0

ImageInput = tuple[torch.Tensor, ...]
"""One prepared image: a (3, H, W) pixel tensor per resolution, the model's own first."""
TokenRows = list[list[int]]
"""One prepared text: token rows (several for a sliding window), each within the context."""


def resolve_model(name: str) -> str:
    """Map a configured model name to what `from_pretrained` loads.

    Args:
        name: `"demo"` for the bundled demo model, otherwise a hub id or local directory.

    Returns:
        The bundled directory for `"demo"`; any other name unchanged.
    """
    if name == DEMO_MODEL:
        return str(Path(clipsearch.__file__).parent / "demo" / "model")
    return name


class ClipEncoder:
    """Encodes texts and images into one embedding space.

    `prepare_image` and `prepare_text` are thread-safe and meant to run off the model's
    thread; `encode_pixels` and `encode_tokens` run the model and should be called from one
    thread at a time.

    Attributes:
        model_id: The model name as configured (`"clipsearch-demo"` for the demo model).
        dim: Embedding dimension.
        max_text_tokens: Context length in tokens (special tokens included).
        image_size: The model's input resolution in pixels.
        device: `"cpu"` or `"cuda"`.
        dtype: `"fp32"`, `"bf16"`, `"fp16"` or `"int8"`.
        scales: Image resolutions embedded and averaged, the model's own first.
        reducing_gap: 0, or how far above the largest resolution a pre-shrink stops.
        min_image_side: The short side a large image is shrunk to at the least (and the
            least a decoder may scale it to, `decode_image(min_side=...)`); 0: never shrunk.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        torch_threads: int = 0,
        multiscale_sizes: Sequence[int] = (),
        reducing_gap: float = 0.0,
    ) -> None:
        """Load model, tokenizer and image processor.

        Args:
            model: `"demo"`, a hub id or a local directory.
            device: `"cpu"` or `"cuda"`.
            dtype: `"fp32"`, `"bf16"`, `"fp16"` (cuda only) or `"int8"` (dynamic
                quantisation of the linear layers, cpu only).
            torch_threads: torch intra-op threads for this process; 0 keeps torch's default.
            multiscale_sizes: Extra image resolutions whose embeddings are averaged with the
                one at the model's resolution; empty for none.
            reducing_gap: 0 preprocesses every image exactly as the checkpoint's processor
                does. Otherwise (>= 1) a large image is first shrunk by box averaging, by
                the largest whole factor that keeps its short side >= reducing_gap x the
                largest resolution (Pillow's `reducing_gap`), and the processor resizes the
                rest of the way: a fraction of the resize's cost, pixels within a few levels.

        Raises:
            ValueError: An unknown device or dtype, fp16 on cpu, int8 on cuda, or a
                non-positive image size.
            RuntimeError: CUDA is not available, or the model cannot be loaded.
        """
        self.device = _check_device(device)
        self.dtype = dtype
        load_dtype = _check_dtype(dtype, device)
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.model_id = DEMO_MODEL_ID if model == DEMO_MODEL else model
        self._model, tokenizer, self._processor = _load(resolve_model(model), load_dtype)
        self._model.to(self.device).eval()
        if dtype == "int8":
            self._model = _quantised(self._model)
        self._pixel_dtype = load_dtype or torch.float32
        self.max_text_tokens = _context_length(self._model.config, tokenizer)
        self._text = TextTokenizer(tokenizer, self.max_text_tokens)
        self._tokenizer = tokenizer
        self._padding = (
            "max_length"
            if self._model.config.model_type in _PAD_TO_CONTEXT_MODEL_TYPES
            else "longest"
        )
        self._crops_centre = _crops_centre_after_resize(self._processor)
        self.image_size = _image_size(self._model.config)
        self.scales = (self.image_size, *_check_scales(multiscale_sizes, self.image_size))
        self.reducing_gap = _check_reducing_gap(reducing_gap)
        self.min_image_side = math.ceil(self.reducing_gap * max(self.scales))
        # The processor's own recipe without its overhead, where probes show equal output.
        self._fast_pixels = (
            for_processor(self._processor, self.scales[1:]) if self._crops_centre else None
        )
        self.dim = 0
        self.dim = self._probe_dim()

    def prepare_image(self, image: Image.Image) -> ImageInput:
        """Run the checkpoint's image processor on one RGB image, once per scale.

        Returns:
            One (3, H, W) float32 pixel tensor per entry of `scales`.
        """
        if self._crops_centre:
            image = _limit_aspect(image, _MAX_ASPECT_BEFORE_CROP)
        if self.min_image_side and min(image.size) >= 2 * self.min_image_side:
            factor = min(image.size) // self.min_image_side
            image = image.reduce(factor)
        return tuple(self._pixels(image, size) for size in self.scales)

    def prepare_text(
        self, text: str, long_text: LongText = "truncate", stride: int = 0
    ) -> TokenRows:
        """Tokenise one text into rows that fit the context (see `encoder_service.text`)."""
        return self._text.rows(text, long_text, stride)

    @torch.inference_mode()
    def encode_pixels(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed prepared images.

        Args:
            images: Results of `prepare_image`.

        Returns:
            A (B, dim) float32 array of L2-normalised rows (the mean over scales,
            re-normalised, when there are several).
        """
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        total: torch.Tensor | None = None
        for index, size in enumerate(self.scales):
            stacked = torch.stack([item[index] for item in images])
            stacked = stacked.to(self.device, self._pixel_dtype)
            output = self._model.get_image_features(
                pixel_values=stacked, interpolate_pos_encoding=size != self.image_size
            )
            unit = _unit(output)
            total = unit if total is None else total + unit
        assert total is not None  # scales is never empty
        return _numpy(torch.nn.functional.normalize(total, dim=-1))

    @torch.inference_mode()
    def encode_tokens(self, texts: Sequence[TokenRows]) -> np.ndarray:
        """Embed prepared texts: every row at once, then each text's rows averaged.

        Args:
            texts: Results of `prepare_text`.

        Returns:
            A (B, dim) float32 array of L2-normalised rows.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = [row for text in texts for row in text]
        batch = self._tokenizer.pad(
            {"input_ids": rows},
            padding=self._padding,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        output = self._model.get_text_features(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        units = _unit(output)
        if len(rows) == len(texts):
            return _numpy(units)
        owner = torch.tensor([n for n, text in enumerate(texts) for _ in text], device=self.device)
        sums = torch.zeros(len(texts), units.shape[1], device=self.device).index_add_(
            0, owner, units
        )
        return _numpy(torch.nn.functional.normalize(sums, dim=-1))

    def encode_texts(
        self, texts: Sequence[str], long_text: LongText = "truncate", stride: int = 0
    ) -> np.ndarray:
        """Tokenise and embed texts in one call (see `prepare_text`, `encode_tokens`)."""
        return self.encode_tokens([self.prepare_text(t, long_text, stride) for t in texts])

    def _pixels(self, image: Image.Image, size: int) -> torch.Tensor:
        """Preprocess at the checkpoint's resolution or at `size` pixels."""
        if self._fast_pixels is not None:
            fast = (
                self._fast_pixels(image)
                if size == self.image_size
                else self._fast_pixels(image, size, (size, size))
            )
            if fast is not None:
                return fast
        overrides = {} if size == self.image_size else _size_overrides(self._processor, size)
        # Without an explicit layout a 1x1 or 3xN image is read as channels-first and breaks.
        batch = self._processor(
            images=[image], return_tensors="pt", input_data_format="channels_last", **overrides
        )
        return batch["pixel_values"][0]

    def _probe_dim(self) -> int:
        """Run both towers once: proves the checkpoint works and measures its dimension."""
        text_dim = self.encode_texts(["a photo"]).shape[1]
        grey = Image.new("RGB", (64, 48), (128, 128, 128))
        image_dim = self.encode_pixels([self.prepare_image(grey)]).shape[1]
        if text_dim != image_dim:
            raise RuntimeError(
                f"model {self.model_id!r} embeds text in {text_dim} dimensions but images "
                f"in {image_dim}; it is not a dual encoder"
            )
        return int(text_dim)


def _check_device(device: str) -> str:
    """Validate the device name and that CUDA exists when asked for."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    return device


def _check_dtype(dtype: str, device: str) -> torch.dtype | None:
    """Map the dtype name to the torch dtype weights load in (None: fp32, then quantised)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    # fp16 matmuls on CPU are slow or unsupported; dynamic quantisation is a CPU kernel.
    if dtype == "fp16" and device != "cuda":
        raise ValueError("dtype 'fp16' needs device 'cuda'; use 'fp32', 'bf16' or 'int8' on cpu")
    if dtype == "int8" and device != "cpu":
        raise ValueError("dtype 'int8' (dynamic quantisation) runs on cpu; use 'fp16' on cuda")
    return _DTYPES[dtype]


def _load(source: str, dtype: torch.dtype | None) -> tuple[Any, Any, Any]:
    """Load model, tokenizer and image processor, or raise RuntimeError naming the source."""
    tried = f"transformers AutoModel/AutoTokenizer/AutoImageProcessor.from_pretrained({source!r})"
    local = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise RuntimeError(f"could not load model: {tried}: directory {local} does not exist")
    options: dict[str, Any] = {"local_files_only": True} if local.is_dir() else {}
    try:
        model = AutoModel.from_pretrained(source, dtype=dtype or torch.float32, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        processor = _image_processor(source, options)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise RuntimeError(f"could not load model: {tried}: {type(exc).__name__}: {exc}") from exc
    for method in ("get_text_features", "get_image_features"):
        if not callable(getattr(model, method, None)):
            raise RuntimeError(  # noqa: TRY004 - a load failure, reported like the others
                f"model {source!r} loaded as {type(model).__name__}, which has no {method}; "
                "a CLIP-style dual encoder is required"
            )
    return model, tokenizer, processor


def _image_processor(source: str, options: dict[str, Any]) -> Any:
    """Prefer the PIL backend: the torchvision one needs torchvision, which we do not ship."""
    try:
        return AutoImageProcessor.from_pretrained(source, backend="pil", **options)
    except (ValueError, KeyError, ImportError):  # no PIL variant for this processor class
        return AutoImageProcessor.from_pretrained(source, **options)


def _context_length(config: Any, tokenizer: Any) -> int:
    """The longest token sequence both the tokenizer and the position table accept."""
    text_config = getattr(config, "text_config", config)
    candidates = [getattr(text_config, "max_position_embeddings", None)]
    candidates.append(getattr(tokenizer, "model_max_length", None))
    # Tokenizers without a configured limit report a huge sentinel (1e30).
    valid = [n for n in candidates if isinstance(n, int) and 0 < n < 1_000_000]
    if not valid:
        raise RuntimeError("cannot determine the model's text context length")
    return min(valid)


def _crops_centre_after_resize(processor: Any) -> bool:
    """True for CLIP-style processors: resize the shortest edge, then crop the centre."""
    size = getattr(processor, "size", None) or {}
    return bool(getattr(processor, "do_center_crop", False)) and "shortest_edge" in size


def _limit_aspect(image: Image.Image, max_aspect: float) -> Image.Image:
    """Crop the centre so the long side is at most `max_aspect` times the short side."""
    width, height = image.size
    short = min(width, height)
    limit = max(1, int(short * max_aspect))
    if max(width, height) <= limit:
        return image
    left = (width - min(width, limit)) // 2
    top = (height - min(height, limit)) // 2
    return image.crop((left, top, left + min(width, limit), top + min(height, limit)))


def _check_reducing_gap(gap: float) -> float:
    """0 (off) or a factor >= 1, as Pillow's `reducing_gap`."""
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap):
        raise ValueError(f"reducing_gap must be a number, got {gap!r}")
    if gap != 0 and gap < 1:
        raise ValueError(f"reducing_gap must be 0 (off) or >= 1, got {gap}")
    return float(gap)


def _unit(output: Any) -> torch.Tensor:
    """The L2-normalised float32 embedding from a features output."""
    # transformers 5 returns an output object with the embedding in `pooler_output`;
    # older versions (and some models) return the tensor itself.
    embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(embedding.float(), dim=-1)


def _numpy(embedding: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of an embedding tensor (on the CPU)."""
    return embedding.cpu().numpy().astype(np.float32, copy=False)


def _image_size(config: Any) -> int:
    """The vision tower's input resolution."""
    vision = getattr(config, "vision_config", config)
    size = getattr(vision, "image_size", None)
    if not isinstance(size, int) or size <= 0:
        raise RuntimeError("cannot determine the model's image size")
    return size


def _check_scales(sizes: Sequence[int], native: int) -> tuple[int, ...]:
    """Distinct extra resolutions, in order, without the model's own."""
    extra: list[int] = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"multiscale_sizes must be positive integers, got {size!r}")
        if size != native and size not in extra:
            extra.append(size)
    return tuple(extra)


def _size_overrides(processor: Any, size: int) -> dict[str, Any]:
    """Processor arguments that make it produce `size` x `size` pixels."""
    if _crops_centre_after_resize(processor):
        return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return {"size": {"height": size, "width": size}}


def _quantised(model: Any) -> Any:
    """Dynamic int8 quantisation of the linear layers (weights int8, activations per batch)."""
    # torch marks eager-mode quantisation deprecated in favour of torchao, but it is still
    # the one int8 path shipped inside torch itself and it works on this torch version.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
