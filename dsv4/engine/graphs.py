"""CUDA graphs of the engine's decode steps: a step's hundreds of kernel launches replayed as one.

A small model's decode step is launch-bound: each layer launches dozens of small kernels, and the host's Python
takes longer to issue them than the GPU to run them. A CUDA graph records the launches of one step once and
replays them at the cost of one. A replay runs the same kernels on the same buffers with the same shapes, so what
it captures is `Transformer.static_decode_streams`, the decode step whose ops and shapes are a function of the
batch size and a position bound (`capacity`) alone, and which reads nothing on the host, followed by the head's
input (the final hc head and norm, [B, dim] fp32), from which the engine computes greedy tokens or logits as
after any step.

One graph per bucket (batch size, capacity), captured when a step first needs it:

* the batch buckets are the powers of two up to `max_batch`, and `max_batch`; a step of n rows runs in the
  smallest bucket that holds them, its padding rows on the cache's spare slot (`KVCacheManager(spare=True)`),
  reset to position 0 at every replay and backed by a scratch page, so their writes reach no sequence;
* the capacities are `page_tokens` (a multiple of every compression ratio) times the powers of two, and the
  largest multiple of `page_tokens` the cache holds: a step whose rows are all below a capacity reads the
  entries of that many positions (a row's past its own count are masked, as always), up to 2x the entries a
  step needs for a graph per doubling of the context.

The inputs live in static buffers (the tokens and the cache slots of each batch bucket), filled before each
replay; the cache's tensors and block table are the engine's own, updated in place between steps, and the view of
the cache through the slots (`Cache.select`) is built inside the capture, so its gather of the block table is
replayed too. Every static step writes the unfinished compressed entry of each row (see `static_decode_streams`),
whose page the engine allocates a few tokens early (`Engine._reserve`).

Steps a graph does not take run eagerly: prefill chunks, speculative steps, a row at position 0, a row asking
for prompt logprobs, positions past the largest capacity. A capture that fails (the step itself having run: its
result stands) turns the graphs off with a warning, and every later decode step runs eagerly: a server keeps
serving.

On a CPU nothing is captured: the same static step runs eagerly from the same buffers and buckets (`_Eager`),
which is how the tests check everything but the capture itself; `tests/op_trace.py` checks that the static
step runs the same ops on the same buffers at any positions within a bucket, what a capture needs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..model import Transformer
from ..model.cache import Cache

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below `max_batch`, then `max_batch`."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


def capacity_buckets(unit: int, limit: int) -> list[int]:
    """unit, 2 unit, 4 unit, ... below the largest multiple of `unit` up to `limit`, then that multiple (none when
    `limit` < unit)."""
    top = limit // unit * unit
    sizes = []
    size = unit
    while size < top:
        sizes.append(size)
        size *= 2
    return sizes + [top] if top else []


class _Eager:
    """A graph's stand-in where nothing is captured (the CPU): made, it runs the step; `replay` runs it again.
    `last` is the latest step's result."""

    def __init__(self, step: Callable[[], Tensor]) -> None:
        self.step = step
        self.last = step()

    def replay(self) -> None:
        self.last = self.step()


class CaptureError(RuntimeError):
    """A decode step ran but could not be captured; `result` is the step's (the warm-up's) result."""

    def __init__(self, message: str, result: Tensor) -> None:
        super().__init__(message)
        self.result = result


class _Captured:
    """A CUDA graph of `step`. Made, it runs the step once on a side stream (its lazy allocations, Triton's
    compilation, the experts' plans: as torch asks before a capture), which is this step's result, then captures it
    (a capture runs nothing; a capture that fails raises `CaptureError` with the result); `replay` runs the graph,
    whose output buffer then holds the result."""

    def __init__(self, step: Callable[[], Tensor], pool) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.last = step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = step()
        except RuntimeError as exc:  # (torch ends the failed capture; the stream runs eagerly again)
            raise CaptureError(f"{type(exc).__name__}: {exc}", self.last) from exc

    def replay(self) -> None:
        self.graph.replay()
        self.last = self.out


def uncapturable(model: Transformer, backend) -> str | None:
    """Why a decode step of `model` on kernel backend `backend` cannot be captured, or None: a capture cannot read
    the device, so every MoE layer's routed experts must be scheduled on the device (`routes_on_device`: the Triton
    backend over experts held in this process, FP8, FP4 or float in the model's dtype, with no training recipe's
    forwards)."""
    probe = torch.zeros(1, model.args.dim, dtype=model.dtype, device=model.embed.weight.device)
    for block in model.layers:
        moe = block.ffn
        if (moe.expert_parallel is not None or moe.replaced_forwards()
                or not backend.routes_on_device(probe, moe.expert_table)):
            return (f"layer {block.layer_id}'s routed experts are not scheduled on the device by the "
                    f"{backend.name!r} kernel backend (capturing needs the triton backend and experts held in this "
                    f"process, without a training recipe's forwards)")
    return None


class DecodeGraphs:
    """The decode-step graphs of one engine: its model, its cache (with a spare slot) and its kernel backend,
    which must be active while steps run (the engine's `step` makes it so)."""

    def __init__(self, model: Transformer, cache: Cache, spare_slot: int, max_batch: int, page_tokens: int) -> None:
        self.model = model
        self.cache = cache
        self.spare_slot = spare_slot
        self.device = model.embed.weight.device
        self.capture = self.device.type == "cuda"
        self.batches = batch_buckets(max_batch)
        self.capacities = capacity_buckets(page_tokens, cache.max_seq_len)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # per batch bucket: the tokens [b, 1] and the cache slots [b] a replay reads
        self.tokens = {b: torch.zeros(b, 1, dtype=torch.long, device=self.device) for b in self.batches}
        self.slots = {b: torch.full((b,), spare_slot, dtype=torch.long, device=self.device) for b in self.batches}
        self.graphs: dict[tuple[int, int], _Eager | _Captured] = {}
        self.steps = self.padded = 0  # steps run, and padding rows among them
        self.failure: str | None = None  # why a capture failed: graphs are off from then on

    def covers(self, n: int, last_position: int) -> bool:
        """Whether a decode of n rows, the furthest at `last_position`, has a bucket (and no capture failed)."""
        return (self.failure is None and n <= self.batches[-1] and bool(self.capacities)
                and last_position < self.capacities[-1])

    def heads(self, tokens: Sequence[int], slots: Sequence[int], last_position: int) -> Tensor:
        """The head inputs [n, dim] fp32 after one decode step of the rows in cache slots `slots` feeding `tokens`,
        whose furthest row is at `last_position` (`covers` must hold). The cache advances as after a forward."""
        n = len(tokens)
        batch = next(b for b in self.batches if b >= n)
        capacity = next(c for c in self.capacities if c > last_position)
        self.steps += 1
        self.padded += batch - n
        fed = torch.tensor([tokens, slots], dtype=torch.long).to(self.device, non_blocking=True)  # [2, n]
        self.tokens[batch][:n, 0] = fed[0]
        self.slots[batch][:n] = fed[1]
        self.slots[batch][n:] = self.spare_slot
        graph = self.graphs.get((batch, capacity))
        if graph is None:
            step = self._step(batch, capacity)
            try:
                graph = self.graphs[batch, capacity] = _Captured(step, self.pool) if self.capture else _Eager(step)
            except CaptureError as exc:  # the step itself ran: its result stands, later steps run eagerly
                self.failure = f"batch {batch}, capacity {capacity}: {exc}"
                log.warning("decode graphs off: a capture failed (%s); decode steps run eagerly", self.failure)
                return exc.result[:n].clone()
        else:
            graph.replay()
        return graph.last[:n].clone()

    def _step(self, batch: int, capacity: int) -> Callable[[], Tensor]:
        tokens, slots, cache, model = self.tokens[batch], self.slots[batch], self.cache, self.model

        def step() -> Tensor:
            cache.lengths[self.spare_slot] = 0  # the padding rows start over at every replay
            streams = model.static_decode_streams(tokens, cache.select(slots), capacity)  # [b, 1, hc, d]
            return model.head_input(streams)[:, 0]  # [b, dim] fp32

        return step
