"""A small byte-level BPE vocabulary for ``transformers.CLIPTokenizer``.

Layout of the vocabulary (same scheme as OpenAI CLIP, just far fewer merges):

* ids ``0..255``: the 256 byte symbols of the GPT-2/CLIP byte->unicode mapping,
* ids ``256..511``: the same symbols with the end-of-word suffix ``</w>``,
* then one id per learned merge (in merge order),
* then ``<|startoftext|>`` and ``<|endoftext|>`` (the last id; CLIP pools on it and
  also pads with it).

The merges are learned here (plain greedy BPE) on the caption grammar of
:mod:`clipsearch.demo.scenes` plus a modest list of common English words, so every
caption word is a single token, while any other text still tokenises through the
byte fallback (every byte symbol is in the vocabulary).

transformers 5 pitfall: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently
ignores both files; always pass ``vocab=dict`` and ``merges=[(a, b), ...]`` (as
:func:`build_tokenizer` does) or load a saved directory with ``from_pretrained``.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from transformers import CLIPTokenizer

from clipsearch.demo import scenes

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TEXT_LENGTH = 32

GRAMMAR_WORDS: tuple[str, ...] = ("a", "at", "the", "in", "on", "background", "shape")
COMMON_WORDS: tuple[str, ...] = tuple(
    """
    an and of with to is are it this that for from by as or not no
    photo picture image drawing icon object thing one two three some
    big tiny little huge medium middle corner side up down upper lower
    dark light bright grey pink brown cyan round sharp pointed
    of left right top bottom center centre near next above below between
    rectangle oval ball box diamond pyramid sun moon sky sea tree house
    car dog cat man woman child person people water fire red green blue
    yellow purple orange white black gray
    """.split()
)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode character map used by GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the remaining bytes (controls,
    space, ...) are shifted to code points 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def caption_words() -> tuple[str, ...]:
    """Every distinct word that can occur in a generated caption or attribute query."""
    words: list[str] = list(GRAMMAR_WORDS)
    for group in (scenes.COLORS, scenes.SHAPES, scenes.SIZES, scenes.POSITIONS, scenes.BACKGROUNDS):
        for phrase in group:
            words.extend(phrase.split())
    return tuple(dict.fromkeys(words))


def word_symbols(word: str) -> tuple[str, ...]:
    """Initial BPE symbols of one pre-tokenised word (byte symbols, last one with ``</w>``)."""
    byte_map = bytes_to_unicode()
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def _merge_word(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(word_counts: dict[str, int]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair until every word is one symbol.

    Ties are broken by the pair itself, so the result is deterministic.
    """
    words = {word_symbols(w): c for w, c in word_counts.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            merged[_merge_word(symbols, best)] += count
        words = dict(merged)


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and ordered merges, caption words weighted highest."""
    counts = {w: 1 for w in COMMON_WORDS}
    counts.update({w: 1000 for w in caption_words()})
    merges = learn_merges(counts)
    base = list(bytes_to_unicode().values())
    tokens = base + [s + END_OF_WORD for s in base] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over :func:`build_vocab_and_merges` (pad = eos = ``<|endoftext|>``)."""
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # the stub says list[str]; pairs work
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_TEXT_LENGTH,
    )
