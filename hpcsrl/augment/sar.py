"""SAR (Sentinel-1 backscatter in dB) ops: multiplicative speckle and a calibration gain.

Both are multiplicative in linear power, hence additive in dB: speckle G multiplies the power, so
the dB value gains 10 log10(G); a gain of g dB adds g. On the normalised band (x_dB - mean) / std
that is an addition of (10 log10 G) / std. Only the band's dB standard deviation is needed, which
the dataset stores, so this is exact (no linear-domain round trip). Without statistics `std_db`
defaults to 1, i.e. the input is treated as plain dB. Nothing here mixes channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hpcsrl.augment.common import chance, uniform


def speckle(x: Tensor, g: torch.Generator, std_db: Tensor, p: float = 0.5,
            looks: tuple[int, int] = (4, 10)) -> Tensor:
    """Gamma speckle of L looks (mean 1, variance 1/L), L drawn per sample from `looks`.

    Gamma(L, 1/L) with integer L is the mean of L unit exponentials, -mean(log U_i): exact with
    a generator (torch's own gamma sampler takes none). std_db: (C,) dB std of each band.
    """
    n = x.shape[0]
    apply = chance(g, n, p)
    n_looks = torch.randint(looks[0], looks[1] + 1, (n,), generator=g)
    if not apply.any():
        return x
    sel, L = x[apply], n_looks[apply].view(-1, 1, 1, 1)
    total = torch.zeros_like(sel)
    for i in range(int(L.max())):
        u = torch.rand(sel.shape, generator=g, dtype=sel.dtype).clamp_min(1e-12)
        total = total - torch.where(i < L, torch.log(u), torch.zeros((), dtype=sel.dtype))
    gain = total / L.to(sel.dtype)
    out = x.clone()
    out[apply] = sel + 10.0 * torch.log10(gain.clamp_min(1e-12)) / std_db.view(1, -1, 1, 1)
    return out


def db_gain(x: Tensor, g: torch.Generator, std_db: Tensor, p: float = 0.5,
            max_db: float = 2.0) -> Tensor:
    """Add one random gain in [-max_db, max_db] dB per sample (same for all polarisations)."""
    n = x.shape[0]
    apply = chance(g, n, p).view(n, 1, 1, 1)
    gain = uniform(g, (n, 1, 1, 1), -max_db, max_db).to(x.dtype)
    return torch.where(apply, x + gain / std_db.view(1, -1, 1, 1).to(x.dtype), x)
