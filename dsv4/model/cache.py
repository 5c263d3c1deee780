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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import CSA_RATIO, ModelArgs


@dataclass
class CompressorState:
    kv: Tensor  # [B, R, coff*c] fp32, raw wkv projections of the last R = coff*ratio tokens
    score: Tensor  # [B, R, coff*c] fp32, wgate projections + ape of the same tokens
    entries: Tensor  # [B, capacity // ratio, c], finished compressed entries

    @classmethod
    def empty(cls, batch: int, ratio: int, width: int, capacity: int, dtype: torch.dtype,
              device: torch.device | str | None) -> CompressorState:
        coff = 2 if ratio == CSA_RATIO else 1
        ring = (batch, coff * ratio, coff * width)
        return cls(
            kv=torch.zeros(ring, dtype=torch.float32, device=device),
            score=torch.zeros(ring, dtype=torch.float32, device=device),
            entries=torch.zeros(batch, capacity // ratio, width, dtype=dtype, device=device),
        )


@dataclass
class LayerCache:
    window: Tensor  # [B, W, head_dim]
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


class Cache:
    """Decoding state for `batch_size` sequences of up to `max_seq_len` tokens each.

    `transient=True` marks the throw-away cache the full-sequence forward uses: nothing is written
    back to the rings, which saves work and keeps training graphs small.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, transient: bool = False) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"Cache needs batch_size > 0 and max_seq_len > 0, got {batch_size}, {max_seq_len}")
        self.args = args
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.transient = transient
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.mtp_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.layers: list[LayerCache] = []
        for layer_id in range(args.n_layers + args.n_mtp_layers):
            ratio = args.layer_ratio(layer_id)
            layer = LayerCache(window=torch.zeros(batch_size, args.window_size, args.head_dim, dtype=dtype,
                                                  device=device))
            if ratio:
                layer.compressor = CompressorState.empty(batch_size, ratio, args.head_dim, max_seq_len, dtype, device)
                if ratio == CSA_RATIO:
                    layer.indexer = CompressorState.empty(batch_size, ratio, args.index_head_dim, max_seq_len,
                                                          dtype, device)
            self.layers.append(layer)

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


@dataclass
class ForwardContext:
    """What every layer needs to know about the current chunk."""

    tokens: Tensor  # [B, S] token ids (hash routing)
    start: Tensor  # [B] position of the chunk's first token in each sequence
    lengths: Tensor  # [B] valid tokens of each row (right padding beyond)
    positions: Tensor  # [B, S] absolute positions start + arange(S)
    exact: bool  # official inference numerics (QAT simulation of the KV / indexer)
    persist: bool  # write the chunk into the cache rings
    indexer_losses: list[Tensor] | None = None  # CSA layers append their indexer KL loss here when set

    @classmethod
    def build(cls, tokens: Tensor, start: Tensor, lengths: Tensor, exact: bool, persist: bool) -> ForwardContext:
        positions = start.unsqueeze(1) + torch.arange(tokens.shape[1], device=tokens.device)
        return cls(tokens, start, lengths, positions, exact, persist)
