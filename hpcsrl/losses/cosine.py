"""Negative cosine similarity with stop-gradient: the Lite-SRL loss (Eq. 1-5), shared by SimSiam."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hpcsrl.precision import full_precision


@full_precision
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """N(p, z) = -(p/|p|) . (z/|z|), averaged over the batch (Eq. 1). No stop-gradient here."""
    return -(F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1).mean()


def lite_srl_loss(p_a: Tensor, p_b: Tensor, e_a: Tensor, e_b: Tensor) -> Tensor:
    """L = 1/2 N(p_a, sg(e_b)) + 1/2 N(p_b, sg(e_a)) (Eq. 5): embeddings are constants."""
    return 0.5 * negative_cosine(p_a, e_b.detach()) + 0.5 * negative_cosine(p_b, e_a.detach())


def split_views(t: Tensor) -> tuple[Tensor, Tensor]:
    """Halves of a sequential-form batch: rows of view a, then rows of view b."""
    n = t.shape[0] // 2
    return t[:n], t[n:]


# SimSiam's objective is the same symmetrised stop-gradient negative cosine.
simsiam_loss = lite_srl_loss
