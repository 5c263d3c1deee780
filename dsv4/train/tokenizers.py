"""Tokenizers for training data: the official one, any `tokenizer.json`, and a byte-level one.

All three are `dsv4.chat.tokenizer.Tokenizer`s, so the chat encoding, the special-token ids, decoding
and streaming detokenization work the same for each, and a model trained on prepared data can carry the
tokenizer as `tokenizer.json` in its directory (`Tokenizer.load(model_dir)` then picks it up).

The byte-level tokenizer exists for small character-level-like experiments (TinyShakespeare, nanoGPT's
benchmark): every UTF-8 byte is its own id, so plain ASCII text gets one id per character, and the V4
special tokens are appended so that chat data renders with the real format. Its ids (270 in all):

    0..255   the byte of that value
    256      <｜begin▁of▁sentence｜>   (BOS, special: dropped by decode(skip_special=True))
    257      <｜end▁of▁sentence｜>     (EOS, also the pad id; special)
    258      <｜User｜>
    259      <｜Assistant｜>
    260      <｜latest_reminder｜>
    261      <think>
    262      </think>
    263      ｜DSML｜                   (so `<｜DSML｜tool_calls>` is `<`, 263, then bytes)
    264..269 <｜action｜> <｜query｜> <｜authority｜> <｜domain｜> <｜title｜> <｜read_url｜>

As with the official tokenizer, a special string inside plain text becomes its single id.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from ..chat import format as fmt
from ..chat.tokenizer import Tokenizer, byte_decoder

__all__ = ["BYTE_SPECIALS", "BYTE_VOCAB_SIZE", "byte_tokenizer", "load_tokenizer", "tokenizer_fingerprint"]

# in id order from 256; BOS and EOS are flagged special (as in the official tokenizer), the chat markers not
BYTE_SPECIALS = (fmt.BOS, fmt.EOS, fmt.USER, fmt.ASSISTANT, fmt.LATEST_REMINDER, fmt.THINK_START, fmt.THINK_END,
                 fmt.DSML, *fmt.TASK_TOKENS.values())
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIALS)


def byte_tokenizer() -> Tokenizer:
    """The byte-level tokenizer described in the module docstring (ids 0..255 bytes, 256.. specials).

    Built as a `tokenizers` BPE without merges over GPT-2's byte alphabet (the same byte-level scheme as the
    official tokenizer), so `tokenizer.json` round-trips and the fast Rust encoder does the work."""
    vocab = {char: byte for char, byte in byte_decoder().items()}  # stand-in character -> its byte = the id
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # regex: speed only
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS[:2]])
    hf.add_tokens([AddedToken(s, special=False, normalized=False) for s in BYTE_SPECIALS[2:]])
    tok = Tokenizer(hf, source="bytes")
    assert tok.vocab_size == BYTE_VOCAB_SIZE and hf.token_to_id(BYTE_SPECIALS[-1]) == BYTE_VOCAB_SIZE - 1
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: two data sets are compatible when it is equal."""
    return hashlib.sha256(tok.hf.to_str().encode("utf-8")).hexdigest()


def load_tokenizer(spec: str | Path) -> tuple[Tokenizer, str]:
    """(tokenizer, name) for "official" (the bundled DeepSeek-V4 one), "bytes", or a tokenizer.json path
    (a file, or a directory holding one). Raises FileNotFoundError for a missing path and ValueError for a
    tokenizer that lacks the V4 special tokens."""
    spec = str(spec)
    if spec == "official":
        return Tokenizer.bundled(), "official"
    if spec == "bytes":
        return byte_tokenizer(), "bytes"
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: not 'official', 'bytes', nor an existing tokenizer.json")
    try:
        return Tokenizer.load(path), str(path)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"tokenizer {path}: cannot read it ({err})") from None
