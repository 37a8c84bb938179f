"""Learning-rate rules: the linear scaling rule, cosine decay, and the data-parallel recipe of
Goyal et al. (linear warm-up from the one-rank rate, then step decay x0.1 or cosine).

Every schedule is a LambdaLR factor *object* holding only plain numbers, so LambdaLR's state_dict
stores its parameters, a checkpoint loads with `weights_only=True`, and a resumed run continues
on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("cosine", "step")
# The seed paper's step decay: x0.1 after 30, 60 and 80 of 100 epochs.
DECAY_FRACTIONS = (0.3, 0.6, 0.8)


def default_lr(batch_size: int, base: float = 0.05) -> float:
    """Linear scaling rule lr = base x batch / 256 (base 0.05 for pre-training, as the paper).

    With k ranks of n patches each the batch is the global k x n, so this is base x k x n / 256.
    """
    return base * batch_size / 256


def default_warmup_epochs(epochs: int, ranks: int) -> int:
    """Warm-up length when nobody chose one: none alone; with several ranks the seed paper's 5
    epochs, at most a tenth of the run (short runs would otherwise never leave the warm-up)."""
    return 0 if ranks <= 1 else min(5, epochs // 10)


def default_decay_epochs(epochs: int) -> list[int]:
    """Step-decay epochs at 30/60/80 % of the run (the seed's 30/60/80 of 100), deduplicated."""
    marks = {max(1, round(f * epochs)) for f in DECAY_FRACTIONS}
    return sorted(m for m in marks if m < epochs)


class CosineDecay:
    """LambdaLR factor: 1/2 (1 + cos(pi t / T)) at iteration t of T (an object, so LambdaLR's
    state_dict stores `total` and a resumed run continues on the same curve)."""

    def __init__(self, total_steps: int) -> None:
        self.total = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


class WarmupDecay:
    """LambdaLR factor: linear warm-up from `start` to 1 over `warmup` iterations, then either a
    cosine decay to 0 at `total` ("cosine") or x `gamma` at each of `milestones` ("step").

    `start` = 1 / ranks makes the warm-up begin at the one-rank rate (Goyal et al.); Horovod's
    ImageNet example does the same. With warmup 0 and "cosine" it equals `CosineDecay`.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, start: float = 1.0,
                 kind: str = "cosine", milestones: Sequence[int] = (), gamma: float = 0.1) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
        self.total = max(1, int(total_steps))
        self.warmup = max(0, min(int(warmup_steps), self.total - 1))
        self.start = float(start)
        self.kind = kind
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (1.0 - self.start) * step / self.warmup
        if self.kind == "step":
            return self.gamma ** sum(1 for m in self.milestones if step >= m)
        t, span = min(step, self.total) - self.warmup, self.total - self.warmup
        return 0.5 * (1.0 + math.cos(math.pi * t / span))
