"""Sensor-independent batched ops: resized crop + flips + 90-degree rotations in one resampling,
Gaussian blur. Every op draws per-sample parameters from a `torch.Generator` in a fixed amount
(independent of the data), so a seed reproduces a batch exactly."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def chance(g: torch.Generator, n: int, p: float) -> Tensor:
    """(n,) bool: which samples an op with probability `p` applies to."""
    return torch.rand(n, generator=g) < p


def random_geometry(x: Tensor, size: int, g: torch.Generator,
                    scale: tuple[float, float] = (0.2, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                    rotate: bool = True) -> Tensor:
    """Random resized crop to `size` x `size`, horizontal/vertical flips and k x 90-degree turns.

    All three are one affine map of the output grid, so the batch is resampled once (bilinear,
    `grid_sample`). The crop covers `scale` of the area with aspect `ratio`; a side longer than the
    image is clipped to it (instead of torchvision's retry loop), which slightly favours larger
    crops at extreme aspects. No anti-aliasing: strong down-scaling aliases a little.
    """
    n = x.shape[0]
    area = uniform(g, (n,), *scale)
    aspect = torch.exp(uniform(g, (n,), math.log(ratio[0]), math.log(ratio[1])))
    fw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
    fh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = uniform(g, (n,), -1.0, 1.0) * (1.0 - fw)  # crop centre, normalised [-1, 1] coordinates
    cy = uniform(g, (n,), -1.0, 1.0) * (1.0 - fh)
    sx = torch.where(chance(g, n, flip_p), -1.0, 1.0)
    sy = torch.where(chance(g, n, flip_p), -1.0, 1.0)
    k = torch.randint(0, 4, (n,), generator=g) if rotate else torch.zeros(n, dtype=torch.long)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[k]
    # source = centre + diag(fw, fh) @ R(k) @ diag(sx, sy) @ output
    a = torch.stack([torch.stack([fw * cos * sx, -fw * sin * sy, cx], dim=1),
                     torch.stack([fh * sin * sx, fh * cos * sy, cy], dim=1)], dim=1)
    grid = F.affine_grid(a.to(x.dtype), [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(x: Tensor, g: torch.Generator, p: float = 0.5,
                  sigma: tuple[float, float] = (0.1, 2.0)) -> Tensor:
    """Blur a random subset of samples with a per-sample sigma (separable, reflect padding)."""
    n, c, h, w = x.shape
    apply = chance(g, n, p)
    s = uniform(g, (n,), *sigma)
    if not apply.any():
        return x
    radius = max(1, min(math.ceil(3 * sigma[1]), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    sel = x[apply]
    m = sel.shape[0]
    k = torch.exp(-(t[None] ** 2) / (2 * s[apply, None].to(x.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c, K)
    y = sel.reshape(1, m * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None],
                 groups=m * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :],
                 groups=m * c)
    out = x.clone()
    out[apply] = y.reshape(m, c, h, w)
    return out
