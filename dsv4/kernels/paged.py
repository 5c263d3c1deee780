"""Where attention finds its KV rows: dense tensors, or rows left in place in a paged pool.

The engine keeps every sequence's compressed entries in pages of a pool shared by all sequences
(`dsv4.engine.kv_cache`), stored in a KV format of `dsv4.kv_formats` (the model dtype, bf16, or the production
FP8 / FP4 byte layouts). The attention op takes such rows as they are, a `PagedRows` (the pool, the block
table, how many rows each sequence may address, and the codec that turns stored rows into compute rows), so
a fast backend can read only the rows it attends to and decode them in its kernel, with no per-step copy of
every page. The reference backend gathers and decodes them all (`PagedRows.dense`), which is what the
attention computed before pages existed. The indexer's scores take its keys the same way, and the seam's
`store_rows` / `load_rows` write rows into such pages (or a cache's window rings, one page a batch row) encoded,
and read them back decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class RowCodec(Protocol):
    """A storage format for KV rows: `encode` gives what the cache holds, `decode` what attention computes with.
    `format` names the entry of `dsv4.kv_formats` it implements and `kind` the row type ("kv": window rows and
    compressed entries; "index": indexer keys), so a backend can recognise a byte layout it decodes itself."""

    format: str
    kind: str
    compute: torch.dtype  # the dtype `decode` gives

    def encode(self, rows: Tensor) -> Tensor:
        """[..., D] rows -> their stored form [..., W]."""

    def decode(self, stored: Tensor) -> Tensor:
        """The stored form [..., W] -> rows [..., D] in the compute dtype."""

    def round_trips(self, dtype: torch.dtype, exact: bool) -> bool:
        """Whether decode(encode(rows)) == rows for the rows a model of `dtype` caches (`exact`: in the official
        numerics, which round what they cache): then a row may be read back from the cache as soon as it is
        written."""


@dataclass(frozen=True)
class PagedRows:
    """Rows 0 .. count-1 of every sequence of a batch, stored in pages.

    Row j of batch row b is `pool[table[b, j // rows_per_page], j % rows_per_page]`; entries past a sequence's
    own count may hold anything (every reader masks them by position)."""

    pool: Tensor  # [num_pages, rows_per_page, width] stored rows (codec form)
    table: Tensor  # [B, max_pages] page ids per batch row
    count: int  # addressable rows per batch row
    codec: RowCodec | None  # stored -> compute rows; None when the pool holds compute rows
    dtype: torch.dtype  # dtype of the decoded rows

    @property
    def rows_per_page(self) -> int:
        return self.pool.shape[1]

    def dense(self) -> Tensor:
        """Every addressable row, decoded: [B, count, D]."""
        pages = -(-self.count // self.rows_per_page)
        stored = self.pool[self.table[:, :pages]].flatten(1, 2)[:, :self.count]  # [B, count, width]
        return stored if self.codec is None else self.codec.decode(stored)


KVRows = Tensor | PagedRows  # one run of rows the attention's indices address


def concat_rows(sources: Tensor | Sequence[KVRows]) -> Tensor:
    """The runs of rows as one dense [B, N, D] tensor in the first run's dtype (index i of the attention
    addresses row i of this concatenation)."""
    if isinstance(sources, Tensor):
        return sources
    runs = [s if isinstance(s, Tensor) else s.dense() for s in sources]
    if len(runs) == 1:
        return runs[0]
    return torch.cat([runs[0]] + [r.to(runs[0].dtype) for r in runs[1:]], dim=1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of each batch element: x [B, N, C], index [B, ...] (values in [0, N)) -> [B, ..., C]."""
    flat = index.reshape(index.shape[0], -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*index.shape, x.shape[-1])
