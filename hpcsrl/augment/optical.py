"""Optical (Sentinel-2 / RGB) photometric ops, applied in physical units.

The dataset hands normalised bands (x - mean) / std; these ops undo that with the band statistics
so brightness is a true multiplicative change of reflectance. Without statistics they act on the
normalised values directly (an approximation: brightness then scales around the band mean).
Colour jitter and random grayscale exist only for true-colour R, G, B inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hpcsrl.augment.common import chance, uniform

# ITU-R BT.601 luma weights (R, G, B) and the RGB -> YIQ matrix used for hue rotation.
LUMA = torch.tensor([0.299, 0.587, 0.114])
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                           [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])


def band_jitter(x: Tensor, g: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                contrast: float = 0.4) -> Tensor:
    """Per-sample, per-band brightness (x * f) and contrast (around the band's mean) jitter."""
    n, c = x.shape[:2]
    apply = chance(g, n, p).view(n, 1, 1, 1)
    f = uniform(g, (n, c, 1, 1), 1 - brightness, 1 + brightness).to(x.dtype)
    k = uniform(g, (n, c, 1, 1), 1 - contrast, 1 + contrast).to(x.dtype)
    y = x * f
    m = y.mean(dim=(2, 3), keepdim=True)
    return torch.where(apply, (y - m) * k + m, x)


def colour_jitter(x: Tensor, g: torch.Generator, p: float = 0.8, brightness: float = 0.4,
                  contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1) -> Tensor:
    """RGB colour jitter: brightness, contrast, saturation, then hue (fixed order, vectorised).

    Hue is a rotation of the chroma plane in YIQ space (a linear stand-in for the HSV hue shift);
    `hue` is the largest turn as a fraction of a full circle. No clipping (bands are unbounded).
    """
    n = x.shape[0]
    apply = chance(g, n, p).view(n, 1, 1, 1)
    fb = uniform(g, (n, 1, 1, 1), 1 - brightness, 1 + brightness).to(x.dtype)
    fc = uniform(g, (n, 1, 1, 1), 1 - contrast, 1 + contrast).to(x.dtype)
    fs = uniform(g, (n, 1, 1, 1), 1 - saturation, 1 + saturation).to(x.dtype)
    theta = uniform(g, (n,), -hue, hue) * 2 * math.pi
    y = x * fb
    gray = grayscale(y)
    y = (y - gray.mean(dim=(2, 3), keepdim=True)) * fc + gray.mean(dim=(2, 3), keepdim=True)
    gray = grayscale(y)
    y = (y - gray) * fs + gray
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (torch.linalg.inv(RGB_TO_YIQ) @ rot @ RGB_TO_YIQ).to(x.dtype)  # (n, 3, 3)
    y = torch.einsum("nij,njhw->nihw", m, y)
    return torch.where(apply, y, x)


def grayscale(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB -> (N, 1, H, W) luma."""
    return torch.einsum("c,nchw->nhw", LUMA.to(x.dtype), x)[:, None]


def random_grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    n = x.shape[0]
    apply = chance(g, n, p).view(n, 1, 1, 1)
    return torch.where(apply, grayscale(x).expand_as(x), x)
