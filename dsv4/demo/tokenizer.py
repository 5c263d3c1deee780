"""The demo model's tokenizer: a small byte-level BPE trained on the demo corpus, with every V4 special token.

Same scheme as the official tokenizer (byte-level BPE read by `tokenizers`, so `dsv4.chat.tokenizer.Tokenizer`
treats both alike), with three differences that suit a few-million-parameter model:
  * a token holds at most one digit, with the space before it if there is one (" 7" is one token, "12" two),
    so a column of an addition is one token per digit and "7 + 4 + 1 = 12" costs 8 tokens, not 13 with a
    space token before each digit; the official tokenizer groups up to three digits;
  * a capitalised word never carries the space before it (" Oslo" is " " + "Oslo"), so a name is the same
    tokens in a sentence and in a tool call's argument, where it follows `">` or a quote: filling in
    `city` is then a plain copy of the user's tokens. With " Oslo" and "Oslo" as two ids, the model would
    have to learn the pairing city by city, and the previous demo model called get_weather for "Tokyo"
    whatever the city;
  * the vocabulary is a few thousand entries, learnt from the corpus, instead of 129,280.

The V4 special tokens are the official tokenizer's added tokens (read from the bundled `tokenizer.json`,
without its reserved place-holders), with the same contents and the same `special` flags: BOS, EOS
and pad first (ids 0, 1, 2 as in the official file), the rest after the learnt vocabulary. So every chat
format string - `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`, `｜DSML｜`, the task tokens - is one id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from ..chat.tokenizer import Tokenizer

__all__ = ["official_special_tokens", "train_tokenizer"]


def _placeholder(content: str) -> bool:
    return "place▁holder" in content or "place_holder" in content


def official_special_tokens() -> list[AddedToken]:
    """The official tokenizer's added tokens in id order, place-holders excluded (contents and flags kept)."""
    official = Tokenizer.bundled().hf.get_added_tokens_decoder()
    return [AddedToken(t.content, special=t.special, normalized=False)
            for _, t in sorted(official.items()) if not _placeholder(t.content)]


def _without_specials(texts: Iterable[str], specials: list[str]) -> Iterator[str]:
    """The texts with each special string replaced by a newline: the specials are added tokens, never merged
    into, so the BPE should not learn merges across them."""
    for text in texts:
        for s in specials:
            if s in text:
                text = text.replace(s, "\n")
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` ids in all (learnt merges + the V4 special tokens) over `texts`.
    Deterministic: the same texts give the same tokenizer.json."""
    specials = official_special_tokens()
    first, rest = specials[:3], specials[3:]  # BOS, EOS, pad: ids 0..2 as in the official file
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(r" ?[0-9]| (?=[A-Z])"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    learnt = vocab_size - len(rest)
    if learnt < 256 + len(first):
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 bytes and {len(specials)} specials")
    trainer = trainers.BpeTrainer(vocab_size=learnt, min_frequency=2, special_tokens=first, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_without_specials(texts, [t.content for t in specials]), trainer=trainer)
    for t in rest:  # one at a time: the official order
        (hf.add_special_tokens if t.special else hf.add_tokens)([t])
    return Tokenizer(hf, source="dsv4-demo-bpe")
