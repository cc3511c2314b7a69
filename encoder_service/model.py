"""The model wrapper: a CLIP-style checkpoint in, L2-normalised float32 embeddings out.

Pure library code (no Ray, no gRPC). Works with any checkpoint that transformers' Auto
classes load into a model with `get_text_features` / `get_image_features` (CLIPModel,
SiglipModel, ...), from a hub id or a local directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import clipsearch
from clipsearch.settings import DEMO_MODEL

DEMO_MODEL_ID = "clipsearch-demo"
"""The `model_id` reported for the bundled demo model."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# SigLIP pools the last token and was trained on texts padded to the full context, so its
# embeddings change with the padding; CLIP pools at EOS under a causal mask, so padding to
# the longest text in the batch gives the same vectors 4-5x faster.
_PAD_TO_CONTEXT_MODEL_TYPES = frozenset({"siglip", "siglip2"})
# Shortest-edge resizing of a 1x10000 strip would build a 224x2,240,000 intermediate;
# cropping the centre to this aspect first keeps the result and bounds the memory.
_MAX_ASPECT_BEFORE_CROP = 2.0
_TEXT_INPUTS = ("input_ids", "attention_mask")


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

    `prepare_image` is thread-safe and meant to run in decode workers; `encode_pixels` and
    `encode_texts` run the model and should be called from one thread at a time.

    Attributes:
        model_id: The model name as configured (`"clipsearch-demo"` for the demo model).
        dim: Embedding dimension.
        max_text_tokens: Context length; longer texts are truncated to it.
    """

    def __init__(
        self, model: str, *, device: str = "cpu", dtype: str = "fp32", torch_threads: int = 0
    ) -> None:
        """Load model, tokenizer and image processor.

        Args:
            model: `"demo"`, a hub id or a local directory.
            device: `"cpu"` or `"cuda"`.
            dtype: `"fp32"`, `"bf16"` or `"fp16"` (fp16 only on cuda).
            torch_threads: torch intra-op threads for this process; 0 keeps torch's default.

        Raises:
            ValueError: An unknown device or dtype, or fp16 on cpu.
            RuntimeError: CUDA is not available, or the model cannot be loaded.
        """
        self._device = torch.device(_check_device(device))
        self._dtype = _check_dtype(dtype, device)
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.model_id = DEMO_MODEL_ID if model == DEMO_MODEL else model
        self._model, self._tokenizer, self._processor = _load(resolve_model(model), self._dtype)
        self._model.to(self._device).eval()
        self.max_text_tokens = _context_length(self._model.config, self._tokenizer)
        self._padding = (
            "max_length"
            if self._model.config.model_type in _PAD_TO_CONTEXT_MODEL_TYPES
            else "longest"
        )
        self._crops_centre = _crops_centre_after_resize(self._processor)
        self.dim = 0
        self.dim = self._probe_dim()

    def prepare_image(self, image: Image.Image) -> torch.Tensor:
        """Run the checkpoint's image processor on one RGB image.

        Returns:
            A (3, H, W) float32 pixel tensor ready for `encode_pixels`.
        """
        if self._crops_centre:
            image = _limit_aspect(image, _MAX_ASPECT_BEFORE_CROP)
        # Without an explicit layout a 1x1 or 3xN image is read as channels-first and breaks.
        batch = self._processor(
            images=[image], return_tensors="pt", input_data_format="channels_last"
        )
        return batch["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed prepared images.

        Args:
            pixels: Tensors from `prepare_image`.

        Returns:
            A (B, dim) float32 array of L2-normalised rows.
        """
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        stacked = torch.stack(list(pixels)).to(self._device, self._dtype)
        return _normalised(self._model.get_image_features(pixel_values=stacked))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, truncating each at `max_text_tokens`.

        Args:
            texts: The texts; validation (non-empty, byte limits) is the caller's job.

        Returns:
            A (B, dim) float32 array of L2-normalised rows.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self._tokenizer(
            list(texts),
            padding=self._padding,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        inputs = {k: v.to(self._device) for k, v in tokens.items() if k in _TEXT_INPUTS}
        return _normalised(self._model.get_text_features(**inputs))

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


def _check_dtype(dtype: str, device: str) -> torch.dtype:
    """Map the dtype name to torch; fp16 matmuls on CPU are slow or unsupported."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device != "cuda":
        raise ValueError("dtype 'fp16' needs device 'cuda'; use 'fp32' or 'bf16' on cpu")
    return _DTYPES[dtype]


def _load(source: str, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Load model, tokenizer and image processor, or raise RuntimeError naming the source."""
    tried = f"transformers AutoModel/AutoTokenizer/AutoImageProcessor.from_pretrained({source!r})"
    local = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) and not local.is_dir():
        raise RuntimeError(f"could not load model: {tried}: directory {local} does not exist")
    options: dict[str, Any] = {"local_files_only": True} if local.is_dir() else {}
    try:
        model = AutoModel.from_pretrained(source, dtype=dtype, **options)
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


def _normalised(output: Any) -> np.ndarray:
    """Take the embedding from a features output, L2-normalise it, return float32 numpy."""
    # transformers 5 returns an output object with the embedding in `pooler_output`;
    # older versions (and some models) return the tensor itself.
    embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
    embedding = torch.nn.functional.normalize(embedding.float(), dim=-1)
    return embedding.cpu().numpy().astype(np.float32, copy=False)
