"""Text preparation: prompt templates and long texts, turned into token rows for the model.

Pure library code (no Ray, no torch). A text becomes one or more token rows, each at most
the model's context long and wrapped in the tokenizer's own special tokens:

- `truncate`: the first `context - specials` content tokens (what `truncation=True` gives);
- `sliding_window`: overlapping windows that together cover every token, the last one
  ending exactly at the text's end (a fixed-step loop would drop the tail);
- `reject`: `InvalidArgument` naming the token count and the context length.

The model embeds every row; a text's vector is the re-normalised mean of its rows' vectors.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from clipsearch.errors import InvalidArgument

LongText = Literal["truncate", "sliding_window", "reject"]
LONG_TEXT_STRATEGIES: tuple[str, ...] = get_args(LongText)
PLACEHOLDER = "{}"


def check_template(template: str) -> str:
    """Return `template` if it holds exactly one "{}" placeholder, else InvalidArgument."""
    if not isinstance(template, str):
        raise InvalidArgument("prompt_template must be a string")
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise InvalidArgument(
            f'prompt_template must contain "{{}}" exactly once (where the text goes), '
            f"found it {count} times in {template[:80]!r}"
        )
    return template


def apply_template(template: str, text: str) -> str:
    """Put `text` where "{}" is. Plain replacement: other braces are literal text."""
    head, tail = check_template(template).split(PLACEHOLDER)
    return f"{head}{text}{tail}"


def window_starts(length: int, width: int, stride: int) -> list[int]:
    """Start offsets of windows of `width` over `length` tokens, `stride` apart.

    The last window always ends at `length`, so no token is left out.
    """
    if width <= 0 or stride <= 0:
        raise ValueError(f"width and stride must be positive, got {width} and {stride}")
    if length <= width:
        return [0]
    last = length - width
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


class TextTokenizer:
    """Turns texts into token rows that fit the model's context.

    Args:
        tokenizer: A transformers tokenizer (fast or slow).
        context_length: Longest row the model accepts, special tokens included.
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self._tokenizer = tokenizer
        self.context_length = context_length
        self._prefix, self._suffix = _special_affixes(tokenizer)
        self.width = context_length - len(self._prefix) - len(self._suffix)
        if self.width < 1:
            raise RuntimeError(f"context length {context_length} leaves no room for text")

    def rows(self, text: str, long_text: LongText = "truncate", stride: int = 0) -> list[list[int]]:
        """Token rows for one (already templated) text under a long-text strategy.

        Args:
            text: The text.
            long_text: `truncate`, `sliding_window` or `reject`.
            stride: Tokens between window starts for `sliding_window`; 0 = half a window.

        Raises:
            InvalidArgument: `reject` and the text is longer than the context.
            ValueError: An unknown strategy.
        """
        ids = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= self.width or long_text == "truncate":
            return [self._wrap(ids[: self.width])]
        if long_text == "reject":
            raise InvalidArgument(
                f"text is {len(ids) + len(self._prefix) + len(self._suffix)} tokens, over the "
                f"model's context of {self.context_length}; shorten it or use long_text "
                "truncate or sliding_window"
            )
        if long_text != "sliding_window":
            raise ValueError(f"long_text must be one of {LONG_TEXT_STRATEGIES}, got {long_text!r}")
        step = stride if stride > 0 else max(1, self.width // 2)
        return [
            self._wrap(ids[s : s + self.width])
            for s in window_starts(len(ids), self.width, min(step, self.width))
        ]

    def _wrap(self, content: list[int]) -> list[int]:
        return [*self._prefix, *content, *self._suffix]


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS ... EOS)."""
    probe = "a photo"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise RuntimeError("cannot tell the tokenizer's special tokens from the text's")
