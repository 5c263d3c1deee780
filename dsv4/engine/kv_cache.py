"""The engine's hybrid KV cache: a fixed state per sequence slot plus compressed entries in pages of a shared pool.

V4's cache has two kinds of memory (spec §4.1, §4.2 and the tech report's "state cache" + "classical paged cache"):

* **state**, constant per sequence: the sliding-window ring of every layer and the compressors' raw tails
  (fp32 K and Z of the last coff·ratio tokens). `max_batch` slots of it are allocated up front;
* **compressed entries**, growing with the context: CSA entries and indexer keys (one per 4 tokens) and HCA
  entries (one per 128). They live in **pages** of `page_tokens` raw tokens (a multiple of every ratio, so a
  page holds page_tokens/4 CSA entries, as many indexer keys and page_tokens/128 HCA entries of every layer;
  the spec's block covers lcm(4, 128) = 128 tokens). One page id indexes the same page in every layer's pool,
  and a block table [slot, page] maps each sequence's pages, as in vLLM.

Pages are reference counted, so the prefix cache can share a sequence's finished pages (entries in a full
page never change again) instead of copying them.

Rows are stored in a format of the registry `dsv4.kv_formats` ("model", "bf16" or "fp8", the production
layouts of spec §4.2); the pools and rings are allocated from its row layout and written and read through its
codec. Compressor tails stay fp32, as in the reference. Attention reads the entries in place
(`PagedEntries.rows` hands it the pool and the block table, `dsv4.kernels.PagedRows`).

Byte accounting is measured from the tensors this module allocates (element size times row width), and equals
`dsv4.plan.kv_plan` for the same model, format and length: both take their row bytes from the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..config import CSA_RATIO, ModelArgs
from ..kernels import KVRows, PagedRows, RowCodec
from ..kv_formats import get_format
from ..model import Cache
from ..model.cache import CacheStorage


class CacheFullError(RuntimeError):
    """The page pool has no free page left (the scheduler preempts or waits)."""


# ---------------------------------------------------------------------------------------------- pages


class PagePool:
    """Reference-counted page ids 0..num_pages-1. A page is free when no sequence or prefix entry holds it."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV page")
        page = self._free.pop()
        self.refs[page] = 1
        return page

    def incref(self, page: int) -> None:
        assert self.refs[page] > 0, f"page {page} is free"
        self.refs[page] += 1

    def decref(self, page: int) -> None:
        assert self.refs[page] > 0, f"page {page} is free"
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free.append(page)


class PagedEntries:
    """An `EntryStore` whose entry j of batch row b lives at pool[table[b, j // per_page], j % per_page]."""

    def __init__(self, pool: Tensor, table: Tensor, per_page: int, codec: RowCodec | None,
                 dtype: torch.dtype) -> None:
        self.pool = pool  # [num_pages, per_page, stored width]
        self.table = table  # [B, max_pages] page ids, shared by every layer's store
        self.per_page = per_page
        self.codec = codec
        self.dtype = dtype

    def rows(self, count: int) -> KVRows:
        return PagedRows(self.pool, self.table, count, self.codec, self.dtype)

    def read(self, count: int) -> Tensor:
        return kernels.load_rows(self.rows(count))  # [B, count, width] decoded

    def destination(self) -> PagedRows:
        return self.rows(self.table.shape[1] * self.per_page)

    def write(self, rows: Tensor, index: Tensor, values: Tensor) -> None:
        # (one op: the pages looked up, the rows encoded and stored, which a backend may do in one kernel)
        kernels.store_rows(values, self.destination(), rows, index)

    def select(self, rows: Tensor, shared: dict | None = None) -> PagedEntries:
        """The same pool under the block-table rows of batch rows `rows` (pages are allocated before a step, so
        the copied table rows stay valid for it), gathered once for every store of a `Cache.select` (`shared`:
        every layer's store holds the same table, one kernel a step instead of one a store)."""
        if shared is None:
            return PagedEntries(self.pool, self.table[rows], self.per_page, self.codec, self.dtype)
        key = ("block_table", id(self.table))
        if key not in shared:  # (the table itself is held with its rows, so no other tensor takes its id meanwhile)
            shared[key] = (self.table, self.table[rows])
        return PagedEntries(self.pool, shared[key][1], self.per_page, self.codec, self.dtype)

    @property
    def page_bytes(self) -> int:
        return self.pool[0].nbytes

    @property
    def row_bytes(self) -> int:
        return self.pool.shape[-1] * self.pool.element_size()


class PagedStorage(CacheStorage):
    """Builds a `Cache` whose compressed entries are paged (pools of `num_pages`) and whose rows use a format."""

    def __init__(self, args: ModelArgs, kv_format: str, num_pages: int, page_tokens: int, max_pages: int,
                 max_batch: int, device: torch.device | str | None) -> None:
        self.args = args
        self.kv_format = kv_format
        self.format = get_format(kv_format)
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.table = torch.zeros(max_batch, max_pages, dtype=torch.long, device=device)
        self.stores: dict[tuple[int, str], PagedEntries] = {}
        self.window_bytes: dict[int, int] = {}  # per layer: stored bytes of one slot's ring

    def window(self, layer_id, shape, dtype, device):
        row = self.format.layout(self.args, "kv", dtype)
        ring = torch.zeros(*shape[:2], row.width, dtype=row.dtype, device=device)
        self.window_bytes[layer_id] = shape[1] * row.nbytes
        return ring, self.format.codec(self.args, "kv", dtype)

    def entries(self, layer_id, kind, batch, capacity, width, dtype, device, differentiable):
        ratio = self.args.layer_ratio(layer_id)
        per_page = self.page_tokens // ratio
        row = self.format.layout(self.args, kind, dtype)
        pool = torch.zeros(self.num_pages, per_page, row.width, dtype=row.dtype, device=device)
        store = PagedEntries(pool, self.table, per_page, self.format.codec(self.args, kind, dtype), dtype)
        self.stores[layer_id, kind] = store
        return store


# ---------------------------------------------------------------------------------------------- sizing


def default_page_tokens(args: ModelArgs) -> int:
    """The smallest multiple of every compression ratio that is at least 64 tokens (128 for V4's 4 / 128)."""
    lcm = math.lcm(*[r for r in args.compress_ratios if r] or [1])
    return lcm * -(-64 // lcm)


@dataclass(frozen=True)
class CacheLayout:
    """Per-slot state bytes and per-page bytes of one (model, format, page size), measured on a 1-slot, 1-page
    cache (so the figures come from real allocations, not from the planner's formula)."""

    state_bytes: int  # one slot: window rings + compressor tails of the main layers
    mtp_state_bytes: int  # one slot: the same for the MTP layers (0 without MTP)
    page_bytes: int  # one page across every main layer's pools
    mtp_page_bytes: int


def measure_layout(args: ModelArgs, dtype: torch.dtype, kv_format: str, page_tokens: int, mtp: bool) -> CacheLayout:
    storage = PagedStorage(args, kv_format, 1, page_tokens, 1, 1, "meta")
    cache = Cache(args, 1, page_tokens, dtype, "meta", storage=storage, mtp=mtp)
    state = [0, 0]
    for layer_id, layer in enumerate(cache.layers):
        mtp_layer = layer_id >= args.n_layers
        state[mtp_layer] += storage.window_bytes[layer_id]
        for comp in (layer.compressor, layer.indexer):
            if comp is not None:
                state[mtp_layer] += comp.kv.nbytes + comp.score.nbytes
    pages = [0, 0]
    for (layer_id, _), store in storage.stores.items():
        pages[layer_id >= args.n_layers] += store.page_bytes
    return CacheLayout(state[0], state[1], pages[0], pages[1])


# ---------------------------------------------------------------------------------------------- the manager


@dataclass
class SlotState:
    """A copy of one sequence's cache at `length` tokens, enough to resume it in any slot: its per-slot
    tensors (window rings, compressor tails), its full pages (held by reference) and a copy of its partial
    last page."""

    length: int
    mtp_length: int
    tensors: list[Tensor]
    pages: list[int]
    partial: list[Tensor] | None
    nbytes: int


class KVCacheManager:
    """The cache of `max_batch` sequence slots and a pool of pages, with the allocation bookkeeping.

    Size it by `num_pages` or by `budget_bytes` (slots' state is taken off the budget first, the rest becomes
    pages). `mtp` adds the MTP block's layers (for speculative decoding). `spare` adds one more slot, `spare_slot`,
    whose every page is one scratch page outside the pool: where the padding rows of a batch bucket (CUDA graphs,
    `dsv4.engine.graphs`) write, never read by a sequence; neither is counted in the budget or `total_bytes`."""

    def __init__(self, model, max_batch: int, max_seq_len: int, kv_format: str = "model",
                 budget_bytes: int | None = None, num_pages: int | None = None, page_tokens: int | None = None,
                 mtp: bool = False, spare: bool = False) -> None:
        args = model.args
        get_format(kv_format).check_model(model.dtype, model.numerics)
        ratios = [r for r in args.compress_ratios if r]
        page_tokens = page_tokens or default_page_tokens(args)
        if page_tokens < 1 or any(page_tokens % r for r in ratios):
            raise ValueError(f"page_tokens must be a positive multiple of every compression ratio {sorted(set(ratios))}"
                             f", got {page_tokens}")
        self.args = args
        self.kv_format = kv_format
        self.page_tokens = page_tokens
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.mtp = mtp and args.n_mtp_layers > 0
        self.layout = measure_layout(args, model.dtype, kv_format, page_tokens, self.mtp)
        self.min_ratio = min(ratios) if ratios else 0
        page_bytes = self.layout.page_bytes + self.layout.mtp_page_bytes
        slot_bytes = self.layout.state_bytes + self.layout.mtp_state_bytes
        if num_pages is None:
            if budget_bytes is None:  # enough for every slot at max_seq_len
                num_pages = max_batch * self.pages_for(max_seq_len)
            else:
                free = budget_bytes - max_batch * slot_bytes
                if free < 0:
                    raise ValueError(f"a KV budget of {budget_bytes:,} B cannot hold the per-sequence state of "
                                     f"{max_batch} slots ({max_batch * slot_bytes:,} B)")
                num_pages = free // page_bytes if page_bytes else 0
        if ratios and num_pages < 1:
            raise ValueError("the KV budget leaves no room for a single page of compressed entries "
                             f"({page_bytes:,} B per {page_tokens} tokens)")
        self.num_pages = num_pages
        self.pool = PagePool(num_pages)
        max_pages = max(1, self.pages_for(max_seq_len))
        device = model.embed.weight.device
        slots, pages = max_batch + spare, max(num_pages, 1) + spare
        self.storage = PagedStorage(args, kv_format, pages, page_tokens, max_pages, slots, device)
        self.cache = Cache(args, slots, max_seq_len, model.dtype, device, storage=self.storage, mtp=self.mtp)
        self.slot_pages: list[list[int]] = [[] for _ in range(max_batch)]
        self.spare_slot = max_batch if spare else None
        if spare:
            self.storage.table[max_batch] = pages - 1  # the scratch page, past the pool's

    # ------------------------------------------------------------------ sizes
    def pages_for(self, length: int) -> int:
        """Pages a sequence of `length` tokens needs: enough for its finished entries of the smallest ratio."""
        if not self.min_ratio:
            return 0
        return -(-(length // self.min_ratio) // (self.page_tokens // self.min_ratio))

    @property
    def total_bytes(self) -> int:
        """Everything allocated: every slot's state and every page."""
        lay = self.layout
        return (self.max_batch * (lay.state_bytes + lay.mtp_state_bytes)
                + self.num_pages * (lay.page_bytes + lay.mtp_page_bytes))

    def sequence_bytes(self, length: int) -> dict[str, int]:
        """Bytes one sequence of `length` tokens occupies in the main layers, by layer type, as the planner
        splits them ("SWA-only", "CSA", "CSA indexer", "HCA"): the slot state plus the finished entries
        (the partial tail of a page excluded: it is paging granularity, which `reserved_bytes` shows)."""
        out: dict[str, int] = {}
        for layer_id, layer in enumerate(self.cache.layers[:self.args.n_layers]):
            ratio = self.args.layer_ratio(layer_id)
            kind = "SWA-only" if not ratio else "CSA" if ratio == CSA_RATIO else "HCA"
            nbytes = self.storage.window_bytes[layer_id]
            for comp, name in ((layer.compressor, kind), (layer.indexer, "CSA indexer")):
                if comp is None:
                    continue
                store = self.storage.stores[layer_id, "kv" if comp is layer.compressor else "index"]
                growing = (length // ratio) * store.row_bytes
                tail = (comp.kv[0].nbytes + comp.score[0].nbytes)
                out[name] = out.get(name, 0) + growing + tail
            out[kind] = out.get(kind, 0) + nbytes
        return out

    def reserved_bytes(self, slot: int) -> int:
        """What a live slot holds now: its state plus its pages (shared pages counted in full)."""
        lay = self.layout
        return (lay.state_bytes + lay.mtp_state_bytes
                + len(self.slot_pages[slot]) * (lay.page_bytes + lay.mtp_page_bytes))

    # ------------------------------------------------------------------ slots
    def ensure(self, slot: int, length: int) -> None:
        """Give `slot` the pages for `length` tokens; raises CacheFullError (allocating nothing) if the pool
        cannot."""
        pages = self.slot_pages[slot]
        need = self.pages_for(length) - len(pages)
        if need <= 0:
            return
        if need > self.pool.free:
            raise CacheFullError(f"slot {slot} needs {need} more pages, {self.pool.free} free")
        for _ in range(need):
            page = self.pool.allocate()
            self.storage.table[slot, len(pages)] = page
            pages.append(page)

    def release(self, slot: int) -> None:
        """Forget the slot's sequence and return its pages (those the prefix cache shares stay with it)."""
        for page in self.slot_pages[slot]:
            self.pool.decref(page)
        self.slot_pages[slot] = []
        self.storage.table[slot] = 0
        self.cache.reset([slot])

    def _slot_tensors(self) -> list[Tensor]:
        """Every per-slot tensor of the cache, [max_batch, ...] each."""
        out = []
        for layer in self.cache.layers:
            out.append(layer.window)
            for comp in (layer.compressor, layer.indexer):
                if comp is not None:
                    out += [comp.kv, comp.score]
        return out

    def save(self, slot: int) -> SlotState:
        """Copy the slot's sequence (see `SlotState`); its full pages gain a reference."""
        length = int(self.cache.lengths[slot])
        tensors = [t[slot].clone() for t in self._slot_tensors()]
        full = length // self.page_tokens if self.min_ratio else 0
        pages = self.slot_pages[slot][:full]
        for page in pages:
            self.pool.incref(page)
        partial = None
        if full < len(self.slot_pages[slot]):
            page = self.slot_pages[slot][full]
            partial = [store.pool[page].clone() for store in self.storage.stores.values()]
        nbytes = sum(t.nbytes for t in tensors) + sum(t.nbytes for t in partial or [])
        return SlotState(length, int(self.cache.mtp_lengths[slot]), tensors, pages, partial, nbytes)

    def load(self, slot: int, state: SlotState) -> None:
        """Resume `state` in an empty slot: shares its full pages, copies its partial page into a new one.
        Raises CacheFullError (changing nothing) if no page is free for the copy."""
        assert not self.slot_pages[slot], "load into a slot that holds a sequence"
        if state.partial is not None and self.pool.free < 1:
            raise CacheFullError("no free page for the prefix's partial page")
        for page in state.pages:
            self.pool.incref(page)
        pages = list(state.pages)
        if state.partial is not None:
            page = self.pool.allocate()
            for store, rows in zip(self.storage.stores.values(), state.partial, strict=True):
                store.pool[page] = rows
            pages.append(page)
        self.slot_pages[slot] = pages
        self.storage.table[slot, :len(pages)] = torch.tensor(pages, dtype=torch.long)
        for target, saved in zip(self._slot_tensors(), state.tensors, strict=True):
            target[slot] = saved
        self.cache.lengths[slot] = state.length
        self.cache.mtp_lengths[slot] = state.mtp_length

    def drop(self, state: SlotState) -> None:
        """Release a saved state's page references."""
        for page in state.pages:
            self.pool.decref(page)
        state.pages = []
