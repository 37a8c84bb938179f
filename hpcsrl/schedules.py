"""Learning-rate rules of the paper: lr = 0.05 x batch / 256, cosine decay over all iterations."""

from __future__ import annotations

import math


def default_lr(batch_size: int, base: float = 0.05) -> float:
    """Linear scaling rule with the paper's base rate 0.05 at batch 256."""
    return base * batch_size / 256


class CosineDecay:
    """LambdaLR factor: 1/2 (1 + cos(pi t / T)) at iteration t of T (an object, so LambdaLR's
    state_dict stores `total` and a resumed run continues on the same curve)."""

    def __init__(self, total_steps: int) -> None:
        self.total = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
