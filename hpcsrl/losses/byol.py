"""BYOL: normalised squared error between online predictions and momentum-target projections."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hpcsrl.precision import full_precision


@full_precision
def _nmse(p: Tensor, z: Tensor) -> Tensor:
    """|p/|p| - z/|z||^2 = 2 - 2 cos(p, z), averaged over the batch; z is a constant."""
    return (2.0 - 2.0 * (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)).mean()


def byol_loss(p_a: Tensor, p_b: Tensor, t_a: Tensor, t_b: Tensor) -> Tensor:
    """Symmetrised: view a's prediction matches view b's target projection and vice versa."""
    return 0.5 * (_nmse(p_a, t_b) + _nmse(p_b, t_a))
