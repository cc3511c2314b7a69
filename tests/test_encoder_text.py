"""Unit tests for encoder_service.text: templates, window placement and long-text strategies."""

from __future__ import annotations

import pytest

from clipsearch.errors import InvalidArgument
from encoder_service.text import TextTokenizer, apply_template, check_template, window_starts
from tests.encoder_fixtures import TINY_CONTEXT, make_tiny_tokenizer

# --- templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "text", "expected"),
    [
        ("{}", "a cat", "a cat"),
        ("a photo of {}", "a cat", "a photo of a cat"),
        ("{}, in {style} style", "a cat", "a cat, in {style} style"),
        ("商品标题:{}", "猫", "商品标题:猫"),
        ("{0.__class__} {}", "x", "{0.__class__} x"),  # never str.format: braces stay text
    ],
)
def test_template_puts_the_text_at_the_placeholder(template: str, text: str, expected: str) -> None:
    assert apply_template(template, text) == expected


@pytest.mark.parametrize(("template", "count"), [("a photo", 0), ("{} and {}", 2), ("", 0)])
def test_template_needs_exactly_one_placeholder(template: str, count: int) -> None:
    with pytest.raises(InvalidArgument, match=f"exactly once.*found it {count} times"):
        check_template(template)


def test_text_containing_braces_is_left_alone() -> None:
    assert apply_template("a photo of {}", "{} {}") == "a photo of {} {}"


# --- window placement ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "width", "stride", "expected"),
    [
        (5, 10, 5, [0]),
        (10, 10, 5, [0]),
        (11, 10, 5, [0, 1]),
        (20, 10, 5, [0, 5, 10]),
        (23, 10, 5, [0, 5, 10, 13]),  # the tail is covered by a window ending at 23
        (30, 10, 10, [0, 10, 20]),
    ],
)
def test_windows_cover_every_token(
    length: int, width: int, stride: int, expected: list[int]
) -> None:
    starts = window_starts(length, width, stride)
    assert starts == expected
    covered = {i for s in starts for i in range(s, min(s + width, length))}
    assert covered == set(range(length))
    assert max(s + width for s in starts) >= length


# --- strategies on a real tokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(make_tiny_tokenizer(), TINY_CONTEXT)


def content(tok: TextTokenizer, text: str) -> list[int]:
    return list(tok._tokenizer(text, add_special_tokens=False)["input_ids"])


LONG = " ".join(f"w{i}" for i in range(40))


def test_short_text_is_one_row_with_special_tokens(tokenizer: TextTokenizer) -> None:
    base = make_tiny_tokenizer()
    assert tokenizer.rows("the cat") == [list(base("the cat")["input_ids"])]


def test_truncate_keeps_what_the_tokenizer_would_keep(tokenizer: TextTokenizer) -> None:
    base = make_tiny_tokenizer()
    expected = base(LONG, truncation=True, max_length=TINY_CONTEXT)["input_ids"]
    assert tokenizer.rows(LONG, "truncate") == [list(expected)]


def test_reject_names_the_token_count_and_the_context(tokenizer: TextTokenizer) -> None:
    total = len(content(tokenizer, LONG)) + 2
    with pytest.raises(InvalidArgument, match=f"text is {total} tokens, over .* of {TINY_CONTEXT}"):
        tokenizer.rows(LONG, "reject")
    assert len(tokenizer.rows("the cat", "reject")) == 1


@pytest.mark.parametrize("stride", [0, 3, 7, 100])
def test_sliding_windows_cover_the_whole_text(tokenizer: TextTokenizer, stride: int) -> None:
    ids = content(tokenizer, LONG)
    rows = tokenizer.rows(LONG, "sliding_window", stride)
    assert len(rows) > 1
    assert all(len(r) <= TINY_CONTEXT for r in rows)
    bos, eos = rows[0][0], rows[0][-1]
    bodies = [r[1:-1] for r in rows]
    assert all(r[0] == bos and r[-1] == eos for r in rows)
    assert bodies[0] == ids[: tokenizer.width]
    assert bodies[-1] == ids[-tokenizer.width :]  # the tail is never dropped
    # Windows are contiguous slices that together reach every position.
    starts = window_starts(
        len(ids), tokenizer.width, min(stride or tokenizer.width // 2, tokenizer.width)
    )
    assert bodies == [ids[s : s + tokenizer.width] for s in starts]


def test_sliding_window_of_a_short_text_is_one_row(tokenizer: TextTokenizer) -> None:
    assert tokenizer.rows("the cat", "sliding_window") == tokenizer.rows("the cat")


def test_unknown_strategy_is_refused(tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="long_text must be one of"):
        tokenizer.rows(LONG, "summarise")  # type: ignore[arg-type]
