"""NT-Xent (SimCLR, Dual-SimCLR): a sample's pair is its positive, the other 2N-2 its negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hpcsrl.precision import full_precision


@full_precision
def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float = 0.2) -> Tensor:
    """Cross-entropy over cosine similarities / temperature, averaged over all 2N anchors.

    Row i of z_a and row i of z_b are a positive pair (two views, or S2 and S1 of one place).
    """
    n = z_a.shape[0]
    z = F.normalize(torch.cat([z_a, z_b], dim=0), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)
