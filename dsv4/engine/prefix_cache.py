"""The prefix cache: saved sequence states keyed by their token prefix, so a request that extends one resumes
from it instead of recomputing it.

V4's cache is not a plain per-token KV list (serving.md §6.10): the window ring and the compressors' partial
blocks depend on where the sequence stops, so a prefix is resumable only at the exact lengths where its whole
state was saved. The engine saves states at the end of each prompt, at the end of each output and every
`interval` tokens of long prompts; a lookup returns the longest saved prefix of a prompt. Full pages of
compressed entries are shared by reference with the sequence that wrote them, so an entry costs its slot
state and one partial page (plus the pages it keeps alive once that sequence is gone).

Keys are BLAKE2 digests of the token ids; a hit is confirmed against the stored ids, so a hash collision can
only cost a miss. Eviction is least-recently-used, inside the cache's own byte budget, and the engine also
evicts when the page pool runs short.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .kv_cache import KVCacheManager, SlotState


def prefix_key(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]
    state: SlotState
    logits: Tensor  # [vocab] the logits after the last token (a prompt equal to the prefix samples from them)
    hidden: Tensor | None = None  # [hc, dim] the last token's final streams (the MTP block's next input)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.nbytes + (self.hidden.nbytes if self.hidden is not None else 0)


class PrefixCache:
    """LRU map from token prefixes to saved states, within `budget_bytes` (entry bytes plus the pages that only
    the cache still holds)."""

    def __init__(self, manager: KVCacheManager, budget_bytes: int) -> None:
        self.manager = manager
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self._lengths: dict[int, int] = {}  # stored prefix length -> number of entries of that length
        self._page_refs: dict[int, int] = {}  # page -> references held by entries
        self.hits = 0  # lookups that found a prefix
        self.lookups = 0
        self.hit_tokens = 0

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Entry copies plus every page the cache references but no running sequence does."""
        held = sum(1 for p, n in self._page_refs.items() if self.manager.pool.refs[p] == n)
        lay = self.manager.layout
        return sum(e.nbytes for e in self._entries.values()) + held * (lay.page_bytes + lay.mtp_page_bytes)

    def lookup(self, tokens: Sequence[int]) -> PrefixEntry | None:
        """The longest stored prefix of `tokens` (it may equal them), marked most recently used."""
        self.lookups += 1
        for length in sorted(self._lengths, reverse=True):
            if length > len(tokens):
                continue
            key = prefix_key(tokens[:length])
            entry = self._entries.get(key)
            if entry is not None and list(entry.tokens) == list(tokens[:length]):
                self._entries.move_to_end(key)
                self.hits += 1
                self.hit_tokens += length
                return entry
        return None

    def contains(self, tokens: Sequence[int]) -> bool:
        return prefix_key(tokens) in self._entries

    def store(self, tokens: Sequence[int], slot: int, logits: Tensor, hidden: Tensor | None = None) -> bool:
        """Save the state of `slot`, which has consumed exactly `tokens` (and, with MTP, the final streams of the
        last one, which its MTP block has not consumed yet); returns whether it was kept."""
        key = prefix_key(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        entry = PrefixEntry(tuple(tokens), self.manager.save(slot), logits.detach().clone(),
                            None if hidden is None else hidden.detach().clone())
        self._entries[key] = entry
        self._lengths[len(tokens)] = self._lengths.get(len(tokens), 0) + 1
        for page in entry.state.pages:
            self._page_refs[page] = self._page_refs.get(page, 0) + 1
        while self._entries and self.nbytes > self.budget_bytes:
            self.evict_one()
        return key in self._entries

    def evict_one(self) -> bool:
        """Drop the least recently used entry; False if the cache is empty."""
        if not self._entries:
            return False
        _, entry = self._entries.popitem(last=False)
        n = len(entry.tokens)
        self._lengths[n] -= 1
        if not self._lengths[n]:
            del self._lengths[n]
        for page in entry.state.pages:
            self._page_refs[page] -= 1
            if not self._page_refs[page]:
                del self._page_refs[page]
        self.manager.drop(entry.state)
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass
