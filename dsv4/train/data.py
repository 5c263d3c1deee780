"""Training data: token shards on disk, chat loss masks, and document packing without cross-document attention.

Shard format (one directory, written by `prepare` / `dsv4 prepare-data`):

    manifest.json           format, version, tokenizer (name, vocab size, sha256, special ids), sources,
                            options, and per split: documents, tokens, loss tokens, whether it has a mask
    tokenizer.json          the tokenizer itself, unless it is the official one (so a trained model can ship it)
    {split}.tokens.u32      every document's token ids back to back (little-endian uint32, memory-mapped)
    {split}.docs.u64        document offsets into the tokens: documents+1 uint64, starting at 0
    {split}.mask.u8         optional, one byte per token: 1 = the token is a loss target. Written only when a
                            split holds chat data; a split without it trains on every token.

`split` is "train" and, with a validation fraction, "val". Everything is written streaming (one document
in memory at a time) and read through `np.memmap`, so neither side holds a corpus in RAM.

Packing (`PackedLoader`): each epoch concatenates a split's documents in a seeded random order, starts at
a seeded offset below `seq_len` and cuts the stream into windows of `seq_len` tokens, visited in a seeded
random order, `batch_size` windows per batch (the epoch's last partial batch is dropped, so shapes never
change). Every token is an input once per epoch. Targets are the next token of the *same* document only
(and only where the loss mask allows): nothing is ever predicted across a boundary.

Sample-level attention masking (V4 §2 / training notes §4.3) is done by `split_documents`, not by a mask
inside the model: each piece of a document in a packed batch becomes its own batch row, right-padded, with
its length, so `model(rows.tokens, lengths=rows.lengths)` computes every document exactly as if it were
alone - no attention, sliding window or compressor state can cross a boundary by construction. A document
longer than what is left of a window continues in another window; that continuation is its own row and is
computed *without* its beginning (its first token sits at position 0 again, as with any fixed-length
training that cuts long documents): its targets are still all in-document, it has only lost context.
Rows are sorted by length; `DocumentRows.buckets` regroups them by similar length to bound padding waste.

Chat data (`render_chat`): each conversation is rendered with the V4 encoding (`dsv4.chat.encoding`), and
the loss mask covers exactly what the assistant produces: each assistant message's reasoning, the
`</think>` that closes it, its content, its DSML tool-call block and the EOS ending its turn. The
template that *introduces* a turn (`<｜Assistant｜><think>` or `<｜Assistant｜></think>`, which the encoder
writes after the user turn, i.e. what the serving side puts in the prompt), BOS, system/user/tool turns and
task tokens are never targets. In chat mode and for earlier turns whose thinking is dropped, `</think>` is
part of the prompt and so not a target; in thinking mode the final turn's `</think>` is the model's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..chat import encoding as enc
from ..chat.tokenizer import Tokenizer
from ..kernels.cross_entropy import IGNORE_INDEX  # F.cross_entropy's default: no target at this position

__all__ = [
    "DATA_FORMATS", "IGNORE_INDEX", "MANIFEST", "SPLIT_MODES",
    "DataError", "DocumentRows", "PackedBatch", "PackedLoader", "Shard", "ShardWriter",
    "detect_format", "open_split", "prepare", "read_manifest", "render_chat", "split_documents",
]

MANIFEST = "manifest.json"
FORMAT_NAME = "dsv4-token-shards"
FORMAT_VERSION = 1
DATA_FORMATS = ("auto", "text", "jsonl", "chat")
SPLIT_MODES = ("auto", "documents", "tokens", "position")
CHAT_LOSSES = ("assistant", "all")
_CHUNK = 1 << 20  # tokens per write when back-filling a mask


class DataError(ValueError):
    """Bad input data or a damaged shard directory; the message names the file (and line)."""


# ================================================================================================ chat


def render_chat(messages: Sequence[Any], tokenizer: Tokenizer, *, tools: Sequence[Any] | None = None,
                thinking_mode: str = "auto", drop_thinking: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids uint32, loss mask uint8, canonical) of one conversation (see the module docstring for the mask).

    thinking_mode "auto" renders in thinking mode when an assistant message carries reasoning
    (`reasoning_content` or `reasoning`), else in chat mode - so plain chat data does not teach the model
    to open and close an empty `<think>`. Pieces are tokenized separately so the mask boundaries are exact;
    `canonical` says whether that equals tokenizing the whole text at once (it does whenever each boundary
    sits next to a special token, which the V4 template guarantees except in unusual message orders)."""
    if thinking_mode == "auto":
        reasoning = any(isinstance(m, dict) and m.get("role") == "assistant"
                        and (m.get("reasoning_content") or m.get("reasoning")) for m in messages)
        thinking_mode = "thinking" if reasoning else "chat"
    segments = enc.encode_segments(messages, tools=tools, thinking_mode=thinking_mode,
                                   drop_thinking=drop_thinking)
    ids: list[int] = []
    mask: list[int] = []
    for text, assistant in segments:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(assistant)] * len(piece)
    canonical = ids == tokenizer.encode("".join(s for s, _ in segments))
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8), canonical


# ================================================================================================ writing


class ShardWriter:
    """Appends documents to one split's files, streaming: memory holds one document at a time.

    The mask file is created at the first document that comes with a mask; the tokens before it are
    back-filled as targets (all-ones), so mixing plain documents and chat in one split works."""

    def __init__(self, root: str | Path, split: str, vocab_size: int):
        self.root, self.split, self.vocab_size = Path(root), split, vocab_size
        self._tokens = open(self.root / f"{split}.tokens.u32", "wb")  # closed by close()
        self._docs = open(self.root / f"{split}.docs.u64", "wb")
        self._docs.write(np.zeros(1, dtype="<u8").tobytes())
        self._mask = None
        self.documents = 0
        self.tokens = 0
        self.loss_tokens = 0

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None) -> None:
        """One document: its token ids and, optionally, its loss mask (1 = target). Empty documents are skipped."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size)):
            raise DataError(f"token ids must be a 1-D sequence in [0, {self.vocab_size})")
        if ids.size == 0:
            return
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != ids.shape:
                raise DataError(f"mask has shape {mask.shape}, ids {ids.shape}")
            if self._mask is None:
                self._mask = open(self.root / f"{self.split}.mask.u8", "wb")
                for done in range(0, self.tokens, _CHUNK):
                    self._mask.write(np.ones(min(_CHUNK, self.tokens - done), dtype=np.uint8).tobytes())
            self._mask.write((mask != 0).astype(np.uint8).tobytes())
            self.loss_tokens += int(np.count_nonzero(mask))
        else:
            if self._mask is not None:
                self._mask.write(np.ones(ids.size, dtype=np.uint8).tobytes())
            self.loss_tokens += ids.size
        self._tokens.write(ids.astype("<u4").tobytes())
        self.tokens += ids.size
        self.documents += 1
        self._docs.write(np.asarray([self.tokens], dtype="<u8").tobytes())

    def close(self) -> dict[str, Any]:
        """Flush and close the files; returns the split's entry of the manifest."""
        for f in (self._tokens, self._docs, self._mask):
            if f is not None:
                f.close()
        return {"documents": self.documents, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "mask": self._mask is not None}


# ================================================================================================ reading


def _memmap(path: Path, dtype: str, count: int) -> np.ndarray:
    expected = count * np.dtype(dtype).itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise DataError(f"{path}: {'missing' if size < 0 else f'{size} bytes'}, expected {expected} bytes")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class Shard:
    """One split, memory-mapped: `tokens` (uint32), `offsets` (uint64, documents+1), `mask` (uint8 or None)."""

    def __init__(self, root: str | Path, split: str, info: dict[str, Any]):
        root = Path(root)
        self.root, self.split = root, split
        self.offsets = _memmap(root / f"{split}.docs.u64", "<u8", info["documents"] + 1)
        self.tokens = _memmap(root / f"{split}.tokens.u32", "<u4", info["tokens"])
        self.mask = _memmap(root / f"{split}.mask.u8", "u1", info["tokens"]) if info["mask"] else None
        if self.offsets.size and (int(self.offsets[0]) != 0 or int(self.offsets[-1]) != info["tokens"]):
            raise DataError(f"{root / f'{split}.docs.u64'}: offsets do not span the {info['tokens']} tokens")
        self.lengths = np.diff(self.offsets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])])

    def document_mask(self, i: int) -> np.ndarray:
        """The loss mask of document i (all ones when the split has no mask file)."""
        if self.mask is None:
            return np.ones(int(self.lengths[i]), dtype=np.uint8)
        return np.asarray(self.mask[int(self.offsets[i]):int(self.offsets[i + 1])])


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root}: no {MANIFEST}; not a prepared data directory (run `dsv4 prepare-data`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    return manifest


def open_split(root: str | Path, split: str = "train") -> Shard:
    """The memory-mapped split `split` of a prepared data directory."""
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{root}: no {split!r} split (has {', '.join(manifest['splits'])})")
    return Shard(root, split, manifest["splits"][split])


# ================================================================================================ preparing


def detect_format(path: Path) -> str:
    """`chat` for JSONL whose first record has "messages", `jsonl` for one with "text", else `text`."""
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return "text"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = _parse_line(line, path, lineno)
                if "messages" in record:
                    return "chat"
                if "text" in record:
                    return "jsonl"
                raise DataError(f"{path}:{lineno}: a record needs \"text\" (documents) or \"messages\" (chat)")
    return "jsonl"


def _parse_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


@dataclass
class _Doc:
    text: str | None = None  # text / jsonl documents
    record: dict[str, Any] | None = None  # chat
    where: str = ""


def _count_documents(path: Path, fmt: str) -> int:
    """How many documents `_documents` will yield (a text file is one; a JSONL file has one per non-blank line)."""
    if fmt == "text":
        return 1
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _documents(path: Path, fmt: str, progress: Callable[[int], None] | None) -> Iterator[_Doc]:
    if fmt == "text":  # one file = one document (read whole: a document is the unit of memory)
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        if progress:
            progress(len(data))
        yield _Doc(text=text, where=str(path))
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if progress:
                progress(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            record = _parse_line(line, path, lineno)
            where = f"{path}:{lineno}"
            if fmt == "jsonl":
                if not isinstance(record.get("text"), str):
                    raise DataError(f"{where}: a document record needs a string \"text\"")
                yield _Doc(text=record["text"], where=where)
            else:
                if not isinstance(record.get("messages"), list):
                    raise DataError(f"{where}: a chat record needs a list \"messages\"")
                yield _Doc(record=record, where=where)


def prepare(inputs: Sequence[str | Path], out: str | Path, *, tokenizer: str = "official", fmt: str = "auto",
            val_fraction: float = 0.0, split: str = "auto", seed: int = 0, bos: bool = True, eos: bool = True,
            thinking_mode: str = "auto", drop_thinking: bool = True, chat_loss: str = "assistant",
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Tokenize `inputs` into a shard directory `out` (created; must be empty) and return its manifest.

    fmt: text (a file is one document), jsonl ({"text": ...} per line), chat ({"messages": [...],
    "tools"?: [...]} per line), or auto (per file: by extension and first record). bos / eos: put BOS
    before / EOS after each text or jsonl document (chat renders its own BOS and per-turn EOS).
    val_fraction with split:
      documents  whole documents: exactly round(n·F) (at least 1) of the n documents go to val, drawn
                 uniformly with `seed` (a cheap first pass counts the documents: non-blank JSONL lines);
      tokens     whole documents, greedily keeping val at F of the tokens so far;
      position   each text/jsonl document is cut: its first (1-F) of characters train, the rest val (the
                 TinyShakespeare split: `data[:int(n*0.9)]` / the rest, as nanoGPT does);
      auto       position for a single text file, documents otherwise.
    chat_loss: "assistant" (the loss mask of `render_chat`: what the assistant produces) or "all" (no mask: every
    token of a conversation is a target, as in pre-training on chat transcripts).
    progress(n) is called with the number of input bytes consumed (for a progress bar)."""
    from .tokenizers import load_tokenizer

    if fmt not in DATA_FORMATS:
        raise DataError(f"format must be one of {', '.join(DATA_FORMATS)}, got {fmt!r}")
    if split not in SPLIT_MODES:
        raise DataError(f"split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
    if thinking_mode not in ("auto", *enc.THINKING_MODES):
        raise DataError(f"thinking_mode must be auto, thinking or chat, got {thinking_mode!r}")
    if chat_loss not in CHAT_LOSSES:
        raise DataError(f"chat_loss must be one of {', '.join(CHAT_LOSSES)}, got {chat_loss!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    formats = [detect_format(p) if fmt == "auto" else fmt for p in paths]
    if split == "auto":
        split = "position" if formats == ["text"] else "documents"
    if split == "position" and val_fraction and "chat" in formats:
        raise DataError("a position split cuts documents in two; chat conversations cannot be cut (use documents)")
    try:
        tok, tok_name = load_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        raise DataError(str(err)) from None

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare(paths, formats, out, tok, tok_name, val_fraction=val_fraction, split=split, seed=seed,
                        bos=bos, eos=eos, thinking_mode=thinking_mode, drop_thinking=drop_thinking,
                        chat_loss=chat_loss, progress=progress)
    except BaseException:  # leave no half-written directory behind: a rerun must not need cleaning up
        for f in out.iterdir():
            f.unlink()
        if created:
            out.rmdir()
        raise


def _prepare(paths, formats, out, tok, tok_name, *, val_fraction, split, seed, bos, eos, thinking_mode,
             drop_thinking, chat_loss, progress) -> dict[str, Any]:
    from .tokenizers import tokenizer_fingerprint

    writers = {"train": ShardWriter(out, "train", tok.vocab_size)}
    if val_fraction:
        writers["val"] = ShardWriter(out, "val", tok.vocab_size)
    in_val = None  # documents split: which document indices go to val
    if val_fraction and split == "documents":
        n = sum(_count_documents(p, f) for p, f in zip(paths, formats, strict=True))
        in_val = np.zeros(n, dtype=bool)
        in_val[np.random.default_rng(seed).permutation(n)[:max(1, round(n * val_fraction))]] = True
    count = 0  # documents seen (documents split)
    val_tokens = all_tokens = 0  # tokens split
    chat_stats = {"conversations": 0, "non_canonical": 0, "without_assistant": 0}
    sources = []

    def text_ids(text: str) -> np.ndarray:
        ids = tok.encode(text)
        return np.asarray(([tok.bos_id] if bos else []) + ids + ([tok.eos_id] if eos else []), dtype=np.uint32)

    try:
        for path, file_fmt in zip(paths, formats, strict=True):
            n_docs = 0
            for doc in _documents(path, file_fmt, progress):
                n_docs += 1
                if doc.text is not None and split == "position" and val_fraction:
                    cut = int(len(doc.text) * (1.0 - val_fraction))
                    writers["train"].add(text_ids(doc.text[:cut]))
                    writers["val"].add(text_ids(doc.text[cut:]))
                    continue
                if doc.text is not None:
                    ids, mask = text_ids(doc.text), None
                else:
                    record = doc.record
                    try:
                        ids, mask, canonical = render_chat(record["messages"], tok, tools=record.get("tools"),
                                                           thinking_mode=thinking_mode, drop_thinking=drop_thinking)
                    except enc.EncodingError as err:
                        raise DataError(f"{doc.where}: {err}") from None
                    chat_stats["conversations"] += 1
                    chat_stats["non_canonical"] += not canonical
                    chat_stats["without_assistant"] += not mask.any()
                    if chat_loss == "all":
                        mask = None
                to_val = False
                if in_val is not None:
                    to_val = bool(in_val[count])
                elif val_fraction and split == "tokens":
                    to_val = val_tokens < val_fraction * (all_tokens + ids.size)
                    val_tokens += ids.size if to_val else 0
                count += 1
                all_tokens += ids.size
                writers["val" if to_val else "train"].add(ids, mask)
            sources.append({"path": str(path), "format": file_fmt, "documents": n_docs})
    finally:
        splits = {name: w.close() for name, w in writers.items()}

    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": "uint32",
        "tokenizer": {"name": tok_name, "vocab_size": tok.vocab_size, "sha256": tokenizer_fingerprint(tok),
                      "file": None if tok_name == "official" else "tokenizer.json",
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "sources": sources,
        "options": {"val_fraction": val_fraction, "split": split, "seed": seed, "bos": bos, "eos": eos,
                    "thinking_mode": thinking_mode, "drop_thinking": drop_thinking, "chat_loss": chat_loss},
        "splits": splits,
    }
    if chat_stats["conversations"]:
        manifest["chat"] = chat_stats
    if tok_name != "official":
        (out / "tokenizer.json").write_text(tok.hf.to_str(pretty=True), encoding="utf-8")
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)  # the manifest appears last: a directory with one is complete
    return manifest


# ================================================================================================ packing


@dataclass
class PackedBatch:
    """`batch_size` windows of `seq_len` tokens cut from the packed document stream.

    tokens [B,L] int64; targets [B,L] int64: the next token of the same document where it is a loss
    target, else IGNORE_INDEX; loss_mask [B,L] bool = targets != IGNORE_INDEX; doc_starts [B,L] bool: True
    where a document piece begins (always at 0); continues [B] bool: the window opens in the middle of a
    document (its first piece is a continuation). epoch / step: where in the loader this batch came from."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    doc_starts: torch.Tensor
    continues: torch.Tensor
    epoch: int
    step: int


class PackedLoader:
    """Deterministic, resumable packed batches over one `Shard` (the order is in the module docstring).

    The order depends only on (seed, epoch), so `state_dict()` is just where we are: a loader restored
    with `load_state_dict` yields exactly the batches an uninterrupted run would have yielded next.
    shuffle=False (validation) keeps the document order, starts at offset 0 and visits windows in order.
    Iterating never ends (epochs follow one another); `batches_per_epoch` tells where one ends."""

    def __init__(self, shard: Shard, seq_len: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        self.shard, self.seq_len, self.batch_size, self.seed, self.shuffle = shard, seq_len, batch_size, seed, shuffle
        # the smallest epoch (start offset seq_len-1) must hold one batch
        if (shard.num_tokens - (seq_len - 1 if shuffle else 0)) // seq_len < batch_size:
            raise ValueError(f"{shard.split} split has {shard.num_tokens} tokens: fewer than one batch of "
                             f"{batch_size} x {seq_len} (plus a start offset of up to {seq_len - 1})")
        self.epoch = 0
        self.step = 0  # batches already taken from this epoch
        self._plan: tuple[int, np.ndarray, np.ndarray, int, np.ndarray] | None = None

    # ---------------------------------------------------------------------------------------------- order

    def _epoch_plan(self, epoch: int):
        """(epoch, document order, stream end of each ordered document, start offset, window order)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan
        n_docs = len(self.shard)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n_docs)
            start = int(rng.integers(self.seq_len))
        else:
            rng, order, start = None, np.arange(n_docs), 0
        ends = np.cumsum(self.shard.lengths[order])
        n_windows = (self.shard.num_tokens - start) // self.seq_len
        windows = rng.permutation(n_windows) if rng is not None else np.arange(n_windows)
        self._plan = (epoch, order, ends, start, windows)
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_plan(self.epoch)[4]) // self.batch_size

    def _window(self, plan, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """tokens, mask, segment (ordered-document index) of stream positions [a, a+L+1), and whether the
        window opens mid-document. Positions past the end of the stream get segment -1."""
        _, order, ends, start, _ = plan
        shard, n = self.shard, self.seq_len + 1
        a = start + w * self.seq_len
        toks = np.zeros(n, dtype=np.int64)
        mask = np.zeros(n, dtype=np.uint8)
        seg = np.full(n, -1, dtype=np.int64)
        i = int(np.searchsorted(ends, a, side="right"))
        pos = a
        continues = False
        while pos < a + n and i < len(order):
            doc_start = int(ends[i]) - int(shard.lengths[order[i]])
            lo, hi = pos - doc_start, min(int(ends[i]), a + n) - doc_start  # document-local range
            if pos == a:
                continues = lo > 0
            base = int(shard.offsets[order[i]])
            j = pos - a
            toks[j:j + hi - lo] = shard.tokens[base + lo:base + hi]
            mask[j:j + hi - lo] = 1 if shard.mask is None else shard.mask[base + lo:base + hi]
            seg[j:j + hi - lo] = i
            pos += hi - lo
            i += 1
        return toks, mask, seg, continues

    # ---------------------------------------------------------------------------------------------- batches

    def next_batch(self) -> PackedBatch:
        if self.step >= self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        plan = self._epoch_plan(self.epoch)
        L, B = self.seq_len, self.batch_size
        tokens = np.zeros((B, L), dtype=np.int64)
        targets = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
        starts = np.zeros((B, L), dtype=bool)
        continues = np.zeros(B, dtype=bool)
        for b in range(B):
            toks, mask, seg, continues[b] = self._window(plan, int(plan[4][self.step * B + b]))
            tokens[b] = toks[:L]
            same = (seg[1:] == seg[:-1]) & (seg[1:] >= 0) & (mask[1:] != 0)
            targets[b] = np.where(same, toks[1:], IGNORE_INDEX)
            starts[b, 0] = True
            starts[b, 1:] = seg[1:L] != seg[:L - 1]
        batch = PackedBatch(torch.from_numpy(tokens), torch.from_numpy(targets),
                            torch.from_numpy(targets != IGNORE_INDEX), torch.from_numpy(starts),
                            torch.from_numpy(continues), self.epoch, self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()

    # ---------------------------------------------------------------------------------------------- resume

    def _fingerprint(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "documents": len(self.shard), "tokens": self.shard.num_tokens}

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (plus what must not change for the position to mean the same batches)."""
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; raises ValueError when the data or the batch shape differ."""
        mine = self._fingerprint()
        diff = [f"{k}: {state.get(k)!r} vs {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError(f"loader state is for other data or settings ({'; '.join(diff)})")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ================================================================================================ documents


@dataclass
class DocumentRows:
    """One batch row per document piece: tokens [N,T] (right-padded with `pad_id`), targets [N,T]
    (IGNORE_INDEX on padding), loss_mask [N,T] bool, lengths [N], and origin [N,2] = (window, start) of
    each row in the packed batch. Rows are sorted by length, longest first."""

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    origin: torch.Tensor

    def to(self, device: torch.device) -> DocumentRows:
        """The same rows on `device` (itself when they are there already)."""
        if self.tokens.device == device:
            return self
        return DocumentRows(*(t.to(device) for t in (self.tokens, self.targets, self.loss_mask, self.lengths,
                                                      self.origin)))

    @property
    def padding_fraction(self) -> float:
        """Share of the [N,T] positions that are padding (the price of one row per document)."""
        total = self.tokens.numel()
        return 1.0 - int(self.lengths.sum()) / total if total else 0.0

    def buckets(self, max_tokens: int, min_fill: float = 0.5) -> list[DocumentRows]:
        """The rows in groups of similar length, each padded only to its own longest row: a group holds at
        most `max_tokens` positions (rows x width; a longer row gets a group of its own) and only rows at least
        `min_fill` x its width long, so padding stays under 1 - min_fill of every group. Fewer, fuller
        groups (lower min_fill) mean fewer forward calls; the losses of the groups add up to the whole."""
        groups, lo, n = [], 0, len(self.lengths)
        lengths = self.lengths.tolist()
        while lo < n:
            width = max(lengths[lo], 1)
            hi = lo + 1
            while hi < n and (hi - lo + 1) * width <= max_tokens and lengths[hi] >= min_fill * width:
                hi += 1
            groups.append(DocumentRows(self.tokens[lo:hi, :width], self.targets[lo:hi, :width],
                                       self.loss_mask[lo:hi, :width], self.lengths[lo:hi], self.origin[lo:hi]))
            lo = hi
        return groups


def split_documents(batch: PackedBatch, pad_id: int = 0, drop_empty: bool = True) -> DocumentRows:
    """One row per document piece of a packed batch, so each is computed exactly as if it were alone:

        rows = split_documents(batch)
        logits = model(rows.tokens, lengths=rows.lengths)               # [N,T,V]
        loss = F.cross_entropy(logits.flatten(0, 1), rows.targets.flatten(), reduction="sum")

    equals the sum over documents of each document's loss computed on its own. drop_empty leaves out pieces
    with no loss target (a last token alone at a window's start, an unmasked prompt-only piece): they
    contribute nothing. The row width T is the longest piece; see `DocumentRows.buckets` for less padding."""
    B, L = batch.tokens.shape
    starts = batch.doc_starts.clone()
    starts[:, 0] = True
    pieces = []  # (length, window, start)
    for b in range(B):
        begin = torch.nonzero(starts[b]).flatten().tolist() + [L]
        for s, e in zip(begin[:-1], begin[1:], strict=True):
            if drop_empty and not bool(batch.loss_mask[b, s:e].any()):
                continue
            pieces.append((e - s, b, s))
    pieces.sort(key=lambda p: -p[0])  # stable: equal lengths keep batch order
    n, width = len(pieces), pieces[0][0] if pieces else 0
    tokens = torch.full((n, width), pad_id, dtype=batch.tokens.dtype)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=batch.targets.dtype)
    for r, (length, b, s) in enumerate(pieces):
        tokens[r, :length] = batch.tokens[b, s:s + length]
        targets[r, :length] = batch.targets[b, s:s + length]
    lengths = torch.tensor([p[0] for p in pieces], dtype=torch.long)
    origin = torch.tensor([[p[1], p[2]] for p in pieces], dtype=torch.long).reshape(n, 2)
    return DocumentRows(tokens, targets, targets != IGNORE_INDEX, lengths, origin)

