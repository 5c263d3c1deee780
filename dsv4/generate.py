"""Generation with the cache: prefill the prompts (any lengths, one batched call), then decode."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .engine.sampling import Sampler, SamplingParams, SequenceState
from .model import Transformer


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stopping at eos when given)
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             eos_id: int | None = None, seed: int = 0) -> GenerationResult:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    cache = model.new_cache(len(prompts), longest + max_new_tokens)
    device = model.embed.weight.device
    sampler = Sampler(eos_id=eos_id, seed=seed)
    params = [SamplingParams(temperature=max(temperature, 0.0), max_tokens=max_new_tokens)] * len(prompts)
    states = [SequenceState(p) for p in prompts]
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], device=device)

    t0 = time.perf_counter()
    logits = model(tokens, cache, lengths=lengths)
    last = logits[torch.arange(len(prompts)), lengths - 1]
    t1 = time.perf_counter()
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = 0
    while True:
        step = sampler.sample(last, params, states)
        nxt = step.tokens
        for b, (t, reason) in enumerate(zip(step.token_ids, step.finish_reasons, strict=True)):
            if not done[b]:
                out[b].append(t)
                done[b] = reason is not None
        if all(done):
            break
        last = model(nxt.unsqueeze(1), cache)[:, -1]
        steps += 1
    t2 = time.perf_counter()
    return GenerationResult(out, int(lengths.sum()), t1 - t0, steps * len(prompts), t2 - t1)
