"""InfoNCE against a queue of past keys (MoCo-v2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hpcsrl.precision import full_precision


@full_precision
def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """Positive logit q.k, negatives q.queue (queue rows are normalised keys of earlier batches).

    q, k: (N, d); queue: (K, d). Keys and queue are constants (no gradient).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
