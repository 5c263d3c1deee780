"""The inference state of a batch of sequences, owned by the caller (not buffers in the modules).

Per block it holds:
  * `window`  [B, W, D]: the sliding-window keys (= values), slot = position % W;
  * for compressed blocks a `CompressorState` for the main KV (and, for CSA, one for the indexer
    keys): the compressed entries written so far [B, capacity // ratio, c], plus the raw per-token
    projections of the most recent `coff * ratio` tokens (a ring, slot = position % (coff * ratio)),
    which is all the compressor needs to finish a partial block later or to use the previous block
    as the overlap half of the next CSA entry.
Because the raw tail is kept per token, a chunk may start at any position and have any length, and
the result equals the full-sequence forward (the official code supports only prefill-from-0 plus
single-token decode). `lengths` counts the tokens each sequence has consumed.

Where rows live is the `CacheStorage`'s choice: by default everything is dense in the model dtype; the
engine supplies a storage that keeps the compressed entries in pages of a shared pool and the rows in the
production byte formats. The model only calls `EntryStore.read/rows/write` and `LayerCache.read/write_window`;
attention receives the entries as `EntryStore.rows` gives them (pages left in place, `dsv4.kernels.PagedRows`).

`Cache.select(rows)` is the same cache seen through some of its batch rows (what an engine step runs on: only
the sequences that have work), writing through to the whole cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from ..kernels import KVRows, PagedRows, RowCodec


class EntryStore(Protocol):
    """Where one compressor keeps its finished entries (entry j of a sequence pools its tokens [j*r, (j+1)*r)).

    Entries at or beyond a row's finished count may hold anything: every read is masked by position, and a
    rolled-back or reset row rewrites them before they become visible."""

    dtype: torch.dtype  # the dtype entries are computed and returned in

    def read(self, count: int) -> Tensor:
        """Entries 0..count-1 of every row, decoded: [B, count, c] in `dtype`."""

    def rows(self, count: int) -> KVRows:
        """Entries 0..count-1 of every row as they are stored (a dense tensor, or `PagedRows` in their pages):
        what the attention op reads in place."""

    def write(self, rows: Tensor, index: Tensor, values: Tensor) -> None:
        """Store values [n, c] as entry index[i] of batch row rows[i]."""

    def destination(self) -> PagedRows | None:
        """Where `write` stores as a `kernels.store_rows` destination, for an op that stores the rows it makes
        (`kernels.norm_rope_store`), or None: written through `write` only."""

    def select(self, rows: Tensor, shared: dict | None = None) -> EntryStore:
        """This store seen through batch rows `rows` (row i of the view is row rows[i] here). `shared`: what the
        views that one `Cache.select` makes may share (a dict it passes to every store, e.g. the engine's stores'
        common block table gathered once for all of them)."""


class DenseEntries:
    """The default `EntryStore`: one [B, capacity, c] tensor. A `differentiable` store (the full forward's
    throw-away cache) writes out of place so that a training graph through the entries stays intact."""

    def __init__(self, data: Tensor, differentiable: bool = False) -> None:
        self.data = data
        self.dtype = data.dtype
        self.differentiable = differentiable

    def read(self, count: int) -> Tensor:
        return self.data[:, :count]

    def rows(self, count: int) -> KVRows:
        return self.read(count)

    def destination(self) -> PagedRows | None:
        return None

    def write(self, rows: Tensor, index: Tensor, values: Tensor) -> None:
        if self.differentiable:
            self.data = self.data.index_put((rows, index), values)
        else:
            self.data.index_put_((rows, index), values.detach())

    def select(self, rows: Tensor, shared: dict | None = None) -> EntryStore:
        return DenseEntryRows(self, rows)


class DenseEntryRows:
    """Some batch rows of a `DenseEntries` (see `Cache.select`)."""

    def __init__(self, parent: DenseEntries, rows: Tensor) -> None:
        self.parent, self.batch_rows, self.dtype = parent, rows, parent.dtype

    def read(self, count: int) -> Tensor:
        return self.parent.data[self.batch_rows, :count]

    def rows(self, count: int) -> KVRows:
        return self.read(count)

    def destination(self) -> PagedRows | None:
        return None

    def write(self, rows: Tensor, index: Tensor, values: Tensor) -> None:
        self.parent.write(self.batch_rows[rows], index, values)

    def select(self, rows: Tensor, shared: dict | None = None) -> EntryStore:
        return DenseEntryRows(self.parent, self.batch_rows[rows])


class CacheStorage:
    """How a `Cache` allocates its growing parts; this default keeps them dense in the model dtype."""

    def window(self, layer_id: int, shape: tuple[int, int, int], dtype: torch.dtype,
               device: torch.device | str | None) -> tuple[Tensor, RowCodec | None]:
        """The window ring of one layer: (stored tensor, codec or None for raw rows) for rows of `shape`."""
        return torch.zeros(shape, dtype=dtype, device=device), None

    def entries(self, layer_id: int, kind: str, batch: int, capacity: int, width: int, dtype: torch.dtype,
                device: torch.device | str | None, differentiable: bool) -> EntryStore:
        """The entry store of one compressor; `kind` is "kv" (attention entries) or "index" (indexer keys)."""
        return DenseEntries(torch.zeros(batch, capacity, width, dtype=dtype, device=device), differentiable)


@dataclass
class CompressorState:
    kv: Tensor  # [B, R, coff*c] fp32, raw wkv projections of the last R = coff*ratio tokens
    score: Tensor  # [B, R, coff*c] fp32, wgate projections + ape of the same tokens
    entries: EntryStore  # finished compressed entries, [B, capacity // ratio, c] logically

    @property
    def ring(self) -> int:
        """R, the tokens the ring holds."""
        return self.kv.shape[1]

    def write_slots(self, slots: Tensor, kv: Tensor, score: Tensor) -> None:
        """Ring slots [B, S] of each row <- kv, score [B, S, coff*c] (distinct slots: S new tokens a row), in place."""
        rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)
        self.kv[rows, slots] = kv
        self.score[rows, slots] = score

    def ring_tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The rings as stored (kv, score [rows, R, coff*c]) and which of their rows are this state's batch rows
        (None: all, in order): what a decode step pools from in place."""
        return self.kv, self.score, None

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, entries: EntryStore,
              device: torch.device | str | None) -> CompressorState:
        coff = 2 if ratio == CSA_RATIO else 1
        ring = (batch, coff * ratio, coff * width)
        return cls(kv=torch.zeros(ring, dtype=torch.float32, device=device),
                   score=torch.zeros(ring, dtype=torch.float32, device=device), entries=entries)


@dataclass
class LayerCache:
    window: Tensor  # [B, W, head_dim] rows, or their stored form under `codec`
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None
    codec: RowCodec | None = None

    def read_window(self) -> Tensor:
        """The window ring as rows [B, W, head_dim]."""
        return self.window if self.codec is None else self.codec.decode(self.window)

    def window_rows(self) -> KVRows:
        """The window ring as attention reads it, in place where it can: [B, W, head_dim] rows."""
        return self.read_window()

    def write_window(self, rows: Tensor) -> None:
        self.window = rows if self.codec is None else self.codec.encode(rows)

    def write_window_slots(self, slots: Tensor, rows: Tensor) -> None:
        """Ring slots [B, S] of each batch row <- rows [B, S, head_dim] (distinct slots: S new tokens), in place: one
        scatter along the slots (an index_put would first build the batch rows' index, a kernel of its own)."""
        stored = rows if self.codec is None else self.codec.encode(rows)
        self.window.scatter_(1, slots.unsqueeze(-1).expand(-1, -1, stored.shape[-1]), stored)

    def window_destination(self) -> PagedRows | None:
        """The rings as a `kernels.store_rows` destination, for an op that stores the rows it makes
        (`kernels.norm_rope_store`), or None: written through `write_window_slots` only (this dense ring)."""
        return None


class Cache:
    """Decoding state for `batch_size` sequences of up to `max_seq_len` tokens each.

    `transient=True` marks the throw-away cache the full-sequence forward uses: nothing is written
    back to the rings, which saves work and keeps training graphs small. `storage` decides where rows live
    (default: dense, model dtype); `mtp=False` leaves out the MTP blocks' layers (no speculation).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, transient: bool = False,
                 storage: CacheStorage | None = None, mtp: bool = True) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"Cache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        self.args = args
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.transient = transient
        self.dtype = dtype
        self.has_mtp = mtp and args.n_mtp_layers > 0
        storage = storage or CacheStorage()
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.mtp_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.layers: list[LayerCache] = []
        for layer_id in range(args.n_layers + (args.n_mtp_layers if self.has_mtp else 0)):
            ratio = args.layer_ratio(layer_id)
            window, codec = storage.window(layer_id, (batch_size, args.window_size, args.head_dim), dtype, device)
            layer = LayerCache(window=window, codec=codec)
            for kind, width in (("kv", args.head_dim), ("index", args.index_head_dim)):
                if not ratio or (kind == "index" and ratio != CSA_RATIO):
                    continue
                store = storage.entries(layer_id, kind, batch_size, max_seq_len // ratio, width, dtype, device,
                                        differentiable=transient)
                state = CompressorState.empty(batch_size, ratio, width, store, device)
                if kind == "kv":
                    layer.compressor = state
                else:
                    layer.indexer = state
            self.layers.append(layer)

    def ring_limit(self) -> int:
        """The most tokens a step may append and still be rolled back exactly: the smallest ring (the window
        or a compressor's raw tail). Beyond it a rejected token overwrites a slot an accepted one wrote."""
        rings = [self.args.window_size]
        for layer in self.layers:
            for state in (layer.compressor, layer.indexer):
                if state is not None:
                    rings.append(state.kv.shape[1])
        return min(rings)

    def snapshot(self, max_tokens: int, kept: int = 0, mtp: bool = True) -> CacheSnapshot:
        """Remember what appending at most `max_tokens` tokens per row (to the main model and, separately, to
        the MTP blocks) can overwrite, so that `rollback` can undo any suffix of such a step exactly; `kept`: the
        rollback keeps at least that many of the main model's appended tokens (a verify step keeps its first);
        `mtp` False: the MTP blocks append nothing before the rollback (a verify step whose drafts came from the
        last step's MTP call), so their rings are not saved and the rollback keeps their lengths.

        Only a slot whose token is undone while a later token is undone too needs its old row back: a ring of R
        slots holds position p's row where p - R's was, and the reads from a kept length L on reach back to
        L - R + 1 only (the window's, the compressors' pooling and ring rewrite), so the slot of L, the first
        undone position, is written again before it is read. So the slots of the step's offsets kept + 1 ..
        max_tokens - 1 (MTP blocks: 1 .. max_tokens - 1) are saved, a gather per ring and layer: O(layers * k *
        width), independent of the sequence length, and nothing at all for a verify step of one draft. Compressed
        entries need no saving: a rolled-back entry is past the kept length, so it is masked until the
        compressor writes it again."""
        if not 1 <= max_tokens <= self.ring_limit():
            raise ValueError(f"max_tokens must be in [1, {self.ring_limit()}] (the smallest cache ring), "
                             f"got {max_tokens}")
        if not 0 <= kept <= max_tokens:
            raise ValueError(f"kept must be in [0, {max_tokens}] (the step's tokens), got {kept}")
        snap = CacheSnapshot(self.lengths.clone(), self.mtp_lengths.clone(), max_tokens, kept, mtp=mtp)
        if kept + 1 >= max_tokens and (not mtp or max_tokens <= 1):
            return snap  # no slot to save on either side (a verify step of one draft)
        rows = torch.arange(self.batch_size, device=self.lengths.device).unsqueeze(1)
        slots: dict[tuple[bool, int], tuple[Tensor, Tensor]] = {}  # (mtp side, ring size) -> positions, slots

        def add(owner: object, attr: str, mtp: bool) -> None:
            first = 1 if mtp else kept + 1
            if first >= max_tokens:
                return
            ring = getattr(owner, attr).shape[1]
            if (mtp, ring) not in slots:
                offsets = torch.arange(first, max_tokens, device=self.lengths.device)
                pos = (snap.mtp_lengths if mtp else snap.lengths).unsqueeze(1) + offsets  # [B,n] positions written
                slots[mtp, ring] = pos, pos % ring
            pos, at = slots[mtp, ring]
            snap.parts.append((owner, attr, pos, at, getattr(owner, attr)[rows, at]))  # indexing copies

        for layer_id, layer in enumerate(self.layers):
            side = layer_id >= self.args.n_layers
            if side and not mtp:
                continue
            add(layer, "window", side)
            for state in (layer.compressor, layer.indexer):
                if state is not None:
                    add(state, "kv", side)
                    add(state, "score", side)
        return snap

    def rollback(self, snap: CacheSnapshot, lengths: Tensor | None = None, mtp_lengths: Tensor | None = None,
                 check: bool = True) -> None:
        """Undo appended tokens: afterwards every row reads as if it had consumed only its first `lengths`
        tokens (main) and `mtp_lengths` (MTP blocks), for lengths between the snapshot's (main: plus its `kept`,
        where the row appended them) and the snapshot's plus `max_tokens` (default: the least of them, i.e. undo
        all that may be undone since `snapshot`). The slot of each side's first undone position keeps the undone
        row: no read reaches it before the next token there rewrites it (see `snapshot`). `check` False skips
        the range checks (four host syncs) for a caller whose lengths are in range by construction (the engine's
        verify step: each row keeps its first token and at most its drafts)."""
        keep = None if lengths is None else torch.as_tensor(lengths, device=snap.lengths.device)
        keep_mtp = snap.mtp_lengths if mtp_lengths is None else torch.as_tensor(mtp_lengths,
                                                                                device=snap.lengths.device)
        if keep is None or check:
            least = torch.minimum(snap.lengths + snap.kept, self.lengths)  # a row that appended nothing keeps none
        if keep is None:
            keep = least
        if check:
            mtp_start = snap.mtp_lengths if snap.mtp else self.mtp_lengths  # unsaved MTP rings: nothing to undo
            for keep_, start, now in ((keep, least, self.lengths), (keep_mtp, mtp_start, self.mtp_lengths)):
                if bool((keep_ < start).any()) or bool((keep_ > now).any()):
                    raise ValueError(f"rollback to {keep_.tolist()}: must lie between the snapshot's "
                                     f"{start.tolist()} and the current {now.tolist()}")
        if snap.parts:
            mtp_owners = {id(o) for layer in self.layers[self.args.n_layers:]
                          for o in (layer, layer.compressor, layer.indexer) if o is not None}
            # a side whose every row keeps all it appended but one (all drafts accepted) has nothing to restore
            undone = {False: bool((keep + 1 < self.lengths).any()), True: bool((keep_mtp + 1 < self.mtp_lengths).any())}
            rows = torch.arange(self.batch_size, device=self.lengths.device).unsqueeze(1)
            for owner, attr, pos, slots, saved in snap.parts:
                if not undone[id(owner) in mtp_owners]:
                    continue
                target = getattr(owner, attr)
                k = (keep_mtp if id(owner) in mtp_owners else keep).unsqueeze(1)
                undo = (pos > k).view(*pos.shape, *([1] * (saved.dim() - 2)))
                target[rows, slots] = torch.where(undo, saved, target[rows, slots])
        self.lengths.copy_(keep)
        self.mtp_lengths.copy_(keep_mtp)

    def reset(self, rows: Tensor | list[int] | None = None) -> None:
        """Forget sequences (all, or the given batch rows) so their slots can start new ones.

        Stale ring contents need no clearing: every read is masked by position.
        """
        if rows is None:
            self.lengths.zero_()
            self.mtp_lengths.zero_()
        else:
            self.lengths[rows] = 0
            self.mtp_lengths[rows] = 0

    def select(self, rows: Tensor) -> CacheRows:
        """This cache seen through batch rows `rows` [n] (distinct): a cache of n sequences whose every read and
        write goes to those rows here. An engine step runs the model on the rows that have work, not on every
        slot; the rows left out are untouched."""
        if self.transient:
            raise ValueError("a transient cache is not viewed by rows")
        return CacheRows(self, rows)


class CacheRows:
    """Batch rows of a `Cache` as a cache of their own (`Cache.select`): the model runs on it as on a `Cache`,
    and its lengths, rings, compressor tails and entries are the parent's, read and written in place."""

    transient = False

    def __init__(self, parent: Cache, rows: Tensor) -> None:
        self.parent = parent
        self.rows = rows
        self.args, self.max_seq_len, self.dtype, self.has_mtp = parent.args, parent.max_seq_len, parent.dtype, \
            parent.has_mtp
        self.batch_size = rows.numel()
        shared: dict = {}  # (what the layers' entry stores seen through these rows share)
        self.layers = [LayerCacheRows(layer, rows, shared) for layer in parent.layers]

    @property
    def lengths(self) -> Tensor:
        return self.parent.lengths[self.rows]

    @lengths.setter
    def lengths(self, value: Tensor) -> None:
        self.parent.lengths[self.rows] = value

    @property
    def mtp_lengths(self) -> Tensor:
        return self.parent.mtp_lengths[self.rows]

    @mtp_lengths.setter
    def mtp_lengths(self, value: Tensor) -> None:
        self.parent.mtp_lengths[self.rows] = value


class LayerCacheRows:
    """Batch rows of a `LayerCache` (see `CacheRows`)."""

    def __init__(self, parent: LayerCache, rows: Tensor, shared: dict | None = None) -> None:
        self.parent = parent
        self.rows = rows
        self.compressor = None if parent.compressor is None else CompressorStateRows(parent.compressor, rows, shared)
        self.indexer = None if parent.indexer is None else CompressorStateRows(parent.indexer, rows, shared)

    def read_window(self) -> Tensor:
        return kernels.load_rows(self._rings())

    def window_rows(self) -> KVRows:
        """These rows' rings left in the parent's: each batch row's ring one page of W rows (no copy), stored rows
        where the attention decodes them itself (`kernels.attends_in_place`), else decoded (one op)."""
        rings = self._rings()
        return rings if kernels.attends_in_place(rings) else kernels.load_rows(rings)

    def _rings(self) -> PagedRows:
        """These rows' rings as they are stored in the parent's: each batch row's ring one page of W rows."""
        window, codec = self.parent.window, self.parent.codec
        return PagedRows(window, self.rows.unsqueeze(1), window.shape[1], codec,
                         window.dtype if codec is None else codec.compute)

    def write_window(self, rows: Tensor) -> None:
        codec = self.parent.codec
        self.parent.window[self.rows] = rows if codec is None else codec.encode(rows)

    def write_window_slots(self, slots: Tensor, rows: Tensor) -> None:
        kernels.store_rows(rows, self._rings(), None, slots)

    def window_destination(self) -> PagedRows | None:
        return self._rings()

    @property
    def codec(self) -> RowCodec | None:
        return self.parent.codec

    @property
    def window(self) -> Tensor:
        return self.parent.window


class CompressorStateRows:
    """Batch rows of a `CompressorState` (see `CacheRows`)."""

    def __init__(self, parent: CompressorState, rows: Tensor, shared: dict | None = None) -> None:
        self.parent = parent
        self.rows = rows
        self.entries = parent.entries.select(rows, shared)

    @property
    def ring(self) -> int:
        return self.parent.kv.shape[1]  # (not `kv`: these rows' ring is a gathered copy)

    @property
    def kv(self) -> Tensor:
        return self.parent.kv[self.rows]

    @kv.setter
    def kv(self, value: Tensor) -> None:
        self.parent.kv[self.rows] = value

    @property
    def score(self) -> Tensor:
        return self.parent.score[self.rows]

    @score.setter
    def score(self, value: Tensor) -> None:
        self.parent.score[self.rows] = value

    def ring_tensors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.parent.kv, self.parent.score, self.rows

    def write_slots(self, slots: Tensor, kv: Tensor, score: Tensor) -> None:
        self.parent.kv[self.rows.unsqueeze(1), slots] = kv
        self.parent.score[self.rows.unsqueeze(1), slots] = score


@dataclass
class CacheSnapshot:
    """What `Cache.snapshot` saved: per mutable tensor, the positions a step may write [B,n], the slots they
    map to [B,n] and the slots' values then [B,n,...]. Holds the owning object and attribute name (the
    forward replaces ring tensors rather than writing them in place)."""

    lengths: Tensor
    mtp_lengths: Tensor
    max_tokens: int
    kept: int  # the main side's rollback keeps at least this many tokens
    parts: list[tuple[object, str, Tensor, Tensor, Tensor]] = field(default_factory=list)
    mtp: bool = True  # the MTP blocks' rings were saved (else the rollback keeps all they hold)


@dataclass
class ForwardTrace:
    """What a training forward records, and the indexer warm-up switch. Pass one to `Transformer.forward`.

    * `indexer_losses`: each CSA layer's indexer KL loss (`indexer_kl_loss`);
    * `routing`: each MoE layer's `RouterRecord` (gate scores, chosen experts) for balancing;
    * `hc_maps`: each sublayer's residual mixing matrix `comb` [B,S,h,h] (stream j -> k), in order, for the
      composite-gain metric of the mHC paper (None entries in "residual" mode);
    * `dense_indexer`: the dense warm-up stage (DeepSeek-V3.2's DSA recipe): CSA attends to every causally
      complete entry and the indexer's KL loss spans all of them, instead of the top-k.
    """

    indexer_losses: list[Tensor] = field(default_factory=list)
    routing: list = field(default_factory=list)
    hc_maps: list[Tensor | None] = field(default_factory=list)
    dense_indexer: bool = False


@dataclass
class ForwardContext:
    """What every layer needs to know about the current chunk."""

    tokens: Tensor  # [B, S] token ids (hash routing)
    start: Tensor  # [B] position of the chunk's first token in each sequence
    lengths: Tensor  # [B] valid tokens of each row (right padding beyond)
    positions: Tensor  # [B, S] absolute positions start + arange(S)
    exact: bool  # official inference numerics (QAT simulation of the KV / indexer)
    persist: bool  # write the chunk into the cache rings
    trace: ForwardTrace | None = None  # what training wants recorded (and how CSA selects)
    # values every layer of this forward would otherwise recompute (RoPE rows, window indices), by key; each must be
    # a function of the chunk (widths, starts, lengths, appends, fresh, persist) and of per-kind constants only (not
    # of the cache or a layer's weights): the next inference forward over the same chunk reads them too
    # (`Transformer._shared_memo`)
    memo: dict = field(default_factory=dict)
    # every row feeds exactly this many tokens and keeps them (a decode or verify step), else 0: rings no wider than
    # it take the tokens in place, a slot each
    appends: int = 0
    # every row starts at position 0 (a new sequence's first chunk): the rings hold nothing any slot names
    fresh: bool = False
    # `start` and `lengths` as the host has them (read once per forward with the checks): what a layer decides on the
    # host (how many entries to pool and read) comes from here, not from another read of a device tensor (each one a
    # wait for the device, and no read can be captured in a CUDA graph)
    host_starts: tuple[int, ...] = ()
    host_lengths: tuple[int, ...] = ()
    # > 0: a static decode step (`Transformer.static_decode_streams`, what a CUDA graph captures), every row at a
    # position below it: the host knows no starts, and each compressor pools an entry in every row and has readers
    # take its first capacity // ratio entries, so that the step's shapes are a function of the batch and this alone
    capacity: int = 0

    def shared(self, key: object, build: Callable[[], Any]) -> Any:
        """`build()` once per forward for `key`, the same object for every layer that asks again."""
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = build()
        return value
