"""The engine on a model-parallel group: one replica of the scheduler per rank, driven in lockstep by rank 0.

Under tensor / expert parallelism every rank must run every forward with the same inputs. Rather than
shipping each step's batch, each rank keeps a full `Engine` (scheduler, cache bookkeeping, sampler) over its
shard of the model, and rank 0 broadcasts the only inputs an engine has: the requests added and aborted since
the last step. Everything else is deterministic given those — admission, chunking, preemption, prefix-cache
choices, and sampling, since the collectives hand every rank the same logits and the sampler's generators are
seeded the same (pass `seed`) — so the replicas stay identical without further communication.

Rank 0 serves (HTTP, `AsyncEngine`) and calls `step()` as usual; the other ranks call `follow()`, which
returns when rank 0 calls `shutdown()`.

A request's grammar (`SamplingParams.grammar`) holds llguidance state that does not pickle; rank 0 sends its
`spec` and each follower rebuilds it with `grammar_factory` (the chat service's `GrammarCompiler`, set by
`dsv4.runtime`), so every rank masks the same tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.distributed as dist

from .constraint import Grammar
from .engine import Engine, RequestOutput
from .sampling import SamplingParams


class LockstepEngine(Engine):
    """An `Engine` whose `add_request` / `abort` on rank 0 are replayed on every rank at the next `step`.

    Needs an explicit `seed` (the sampler's shared generator must start equal on every rank)."""

    def __init__(self, model, *args, seed: int | None = None, group: dist.ProcessGroup | None = None, **kwargs):
        if seed is None:
            raise ValueError("LockstepEngine needs a seed: every rank's sampler must draw the same numbers")
        super().__init__(model, *args, seed=seed, **kwargs)
        self.group = group
        self.rank = dist.get_rank(group)
        self._commands: list[tuple] = []  # rank 0: what the followers have not seen yet
        self.grammar_factory: Callable[[object], Grammar] | None = None  # followers: a grammar from its spec

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        grammar = params.grammar if params is not None else None
        if grammar is not None and grammar.spec is None:
            raise ValueError("a grammar without a spec cannot be replicated on the other ranks")
        rid = super().add_request(prompt_ids, params)  # validation errors raise here, on rank 0 only
        sent = params if grammar is None else dataclasses.replace(params, grammar=None)
        self._commands.append(("add", list(prompt_ids), sent, grammar.spec if grammar is not None else None))
        return rid

    def abort(self, request_id: int) -> RequestOutput | None:
        final = super().abort(request_id)
        if final is not None:
            self._commands.append(("abort", request_id))
        return final

    def step(self) -> list[RequestOutput]:
        """Rank 0: send the pending commands, then step like every follower does."""
        self._broadcast([*self._commands, ("step",)])
        self._commands = []
        return super().step()

    def shutdown(self) -> None:
        """Rank 0: release the followers from `follow()`."""
        self._broadcast([*self._commands, ("stop",)])
        self._commands = []

    def follow(self, on_step: Callable[[list[RequestOutput]], None] | None = None) -> None:
        """Ranks > 0: replay rank 0's commands and steps until it shuts down (`on_step` sees each step's
        updates, which equal rank 0's)."""
        if self.rank == 0:
            raise RuntimeError("rank 0 drives the engine; only the other ranks follow")
        while True:
            for command in self._broadcast(None):
                kind = command[0]
                if kind == "add":
                    params, spec = command[2], command[3]
                    if spec is not None:
                        if self.grammar_factory is None:
                            raise RuntimeError("a constrained request arrived but this rank has no grammar_factory")
                        params = dataclasses.replace(params, grammar=self.grammar_factory(spec))
                    super().add_request(command[1], params)
                elif kind == "abort":
                    super().abort(command[1])
                elif kind == "step":
                    updates = super().step()
                    if on_step is not None:
                        on_step(updates)
                else:
                    return

    def _broadcast(self, commands: list[tuple] | None) -> list[tuple]:
        box = [commands]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return box[0]
