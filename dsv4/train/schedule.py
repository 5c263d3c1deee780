"""V4's learning-rate schedule (warm-up, stable, decay) and the MTP loss-weight schedule.

V4 (report §4.2.2, training.md §1.3): linear warm-up over 2000 steps to the peak, constant for most
of training, cosine decay to 10% of the peak near the end (Flash 2.7e-4 -> 2.7e-5). The same lr
drives Muon and AdamW (γ = 0.18 matches Muon's update RMS to AdamW's). The MTP loss weight is 0.3,
then 0.1 once the lr decays (training.md §8.4).

Everything is a pure function of the step (the index of the optimizer step about to run, from 0),
so a resumed run needs only the step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    """lr(step): peak·(step+1)/warmup_steps during warm-up (the first step already moves, step
    warmup_steps−1 is at the peak), the peak while stable, then a cosine from the peak to
    floor_ratio·peak over the last `decay_steps` steps (the last step, total_steps−1, is at the floor),
    and the floor after total_steps."""

    peak: float
    total_steps: int
    warmup_steps: int = 2000
    decay_steps: int = 0
    floor_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.peak < 0 or not 0 <= self.floor_ratio <= 1:
            raise ValueError(f"LRSchedule: peak={self.peak} must be >= 0, floor_ratio={self.floor_ratio} in [0, 1]")
        if min(self.warmup_steps, self.decay_steps) < 0 or self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"LRSchedule: warmup_steps={self.warmup_steps} + decay_steps={self.decay_steps} "
                             f"must fit in total_steps={self.total_steps}")

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    def in_decay(self, step: int) -> bool:
        return step >= self.decay_start

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak
        floor = self.floor_ratio * self.peak
        t = min(1.0, (step - self.decay_start + 1) / self.decay_steps)
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    def mtp_weight(self, step: int, stable: float = 0.3, decay: float = 0.1) -> float:
        """The MTP loss weight: `stable` (0.3) until the lr decays, then `decay` (0.1)."""
        return decay if self.in_decay(step) else stable


def set_lr(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Write one lr into every param group of one or several optimizers (or an `Optimizers` pair)."""
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
        optimizers = [optimizers]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
