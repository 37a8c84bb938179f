"""The view pipeline per sensor and the two-view call used by the trainer.

optical  crop+flip+rot90 -> colour jitter + random grayscale when the bands are R, G, B, else
         per-band brightness/contrast jitter -> Gaussian blur
sar      crop+flip+rot90 -> Gaussian blur (p .3, sigma <= 1) -> speckle (p .5) -> dB gain (p .5)
s1s2     one geometry for all bands, then the optical ops on the S2 bands and the SAR ops on VV/VH

Strengths come from a named preset (`AUGMENT_PRESETS`, see `AugmentParams`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hpcsrl.augment import optical, sar
from hpcsrl.augment.common import gaussian_blur, random_geometry
from hpcsrl.errors import UserError

SENSORS = ("optical", "sar", "s1s2")
SAR_BANDS = frozenset({"VV", "VH", "HH", "HV"})
RGB_ORDERS = (("R", "G", "B"), ("B04", "B03", "B02"))


@dataclass(frozen=True)
class AugmentParams:
    """Strength of the crop and of the optical photometric ops (probabilities and ranges)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop
    jitter_p: float = 0.8         # colour (RGB) or per-band (multispectral) jitter
    jitter: float = 0.4           # brightness, contrast (and saturation on RGB) range +-
    hue: float = 0.1              # largest hue turn, fraction of a circle (RGB only)
    grayscale_p: float = 0.2      # RGB only
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output view


AUGMENT_PRESETS: dict[str, AugmentParams] = {
    # The ImageNet-style recipe the paper applies to 224-px inputs (Sec. 4.2, Fig. 5).
    "paper": AugmentParams(),
    # Small chips (EuroSAT's 64 px, often trained at 32 px): the paper's crop and colour ops but
    # no blur. Its sigma range (0.1-2 px) was meant for 224-px views; on a 32-64 px view a 2-px
    # sigma wipes out the texture that separates land-cover classes (EuroSAT, 600 steps at 32 px:
    # k-NN / linear-probe accuracy 0.50 / 0.47 with blur, 0.54 / 0.54 without; a random encoder
    # gives 0.42 / 0.55). Dropping hue and grayscale too learned slower (0.44 / 0.51).
    "chips": AugmentParams(blur_p=0.0),
    # 32-px views of 64-px chips near the chips' own resolution: a crop of area fraction s
    # resized to half the chip side scales the ground by 0.5 / sqrt(s), so (0.15, 0.5) gives
    # 0.7-1.3x instead of 0.5-1.1x. EuroSAT RGB, 30 epochs: frozen OA at 10 % labels 0.757 at
    # 128 px (0.723 at 64 px) vs 0.750 (0.719) for "chips" after 32 epochs: equal within noise.
    "chips-native": AugmentParams(blur_p=0.0, crop_scale=(0.15, 0.5)),
    # Colour kept: EuroSAT's classes differ first by colour (a k-NN on channel means and
    # deviations alone scores 0.70 at 10 % labels), and the full jitter plus grayscale teaches
    # the encoder to ignore it; half the brightness/contrast/saturation range, no hue turn, no
    # grayscale, so two views still differ photometrically but keep their hue.
    "chips-mild": AugmentParams(blur_p=0.0, jitter=0.2, hue=0.0, grayscale_p=0.0),
}
DEFAULT_AUGMENT = "chips"


def augment_params(name: str) -> AugmentParams:
    if name not in AUGMENT_PRESETS:
        raise UserError(f"unknown augmentation preset {name!r}: choose one of "
                        f"{', '.join(AUGMENT_PRESETS)}")
    return AUGMENT_PRESETS[name]


def _as_stat(v: Sequence[float] | np.ndarray | Tensor | None, c: int, default: float) -> Tensor:
    if v is None:
        return torch.full((c,), default)
    t = torch.as_tensor(np.asarray(v, dtype=np.float32).reshape(-1))
    if t.numel() != c:
        raise ValueError(f"band statistics have {t.numel()} values for {c} bands")
    return t


class ViewTransform:
    """Callable `(x (N, C, H, W), generator) -> view (N, C, size, size)` for one sensor."""

    def __init__(self, sensor: str, band_names: Sequence[str], input_size: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 params: AugmentParams | None = None) -> None:
        if sensor not in SENSORS:
            raise UserError(f"unknown sensor {sensor!r}: choose one of {', '.join(SENSORS)}")
        names = tuple(band_names)
        c = len(names)
        self.sensor, self.band_names, self.size = sensor, names, input_size
        self.params = params or AUGMENT_PRESETS[DEFAULT_AUGMENT]
        self.mean, self.std = _as_stat(mean, c, 0.0), _as_stat(std, c, 1.0)
        is_sar = [sensor == "sar" or (sensor == "s1s2" and b.upper() in SAR_BANDS) for b in names]
        self.sar_idx = [i for i, s in enumerate(is_sar) if s]
        self.opt_idx = [i for i, s in enumerate(is_sar) if not s]
        self.rgb = tuple(names[i] for i in self.opt_idx) in RGB_ORDERS

    def steps(self) -> list[str]:
        """Names of the ops this sensor runs, in order (documentation and tests)."""
        out = ["crop_flip_rot90"]
        if self.opt_idx:
            out += ["colour_jitter", "random_grayscale"] if self.rgb else ["band_jitter"]
            if self.params.blur_p > 0:
                out.append("blur")
        if self.sar_idx:
            out += ["sar_blur", "speckle", "db_gain"]
        return out

    def _optical(self, x: Tensor, g: torch.Generator) -> Tensor:
        idx = self.opt_idx
        mean, std = self.mean[idx].view(1, -1, 1, 1), self.std[idx].view(1, -1, 1, 1)
        q = self.params
        y = x * std + mean  # physical units (reflectance or DN) for multiplicative ops
        if self.rgb:
            y = optical.colour_jitter(y, g, p=q.jitter_p, brightness=q.jitter,
                                      contrast=q.jitter, saturation=q.jitter, hue=q.hue)
            y = optical.random_grayscale(y, g, p=q.grayscale_p)
        else:
            y = optical.band_jitter(y, g, p=q.jitter_p, brightness=q.jitter, contrast=q.jitter)
        y = (y - mean) / std
        return gaussian_blur(y, g, p=q.blur_p, sigma=q.blur_sigma) if q.blur_p > 0 else y

    def _sar(self, x: Tensor, g: torch.Generator) -> Tensor:
        std_db = self.std[self.sar_idx]
        x = gaussian_blur(x, g, p=0.3, sigma=(0.1, 1.0))
        return sar.db_gain(sar.speckle(x, g, std_db), g, std_db)

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        if x.shape[1] != len(self.band_names):
            raise ValueError(f"batch has {x.shape[1]} bands, transform expects "
                             f"{len(self.band_names)}")
        x = random_geometry(x, self.size, g, scale=self.params.crop_scale)
        out = x.clone()
        if self.opt_idx:
            out[:, self.opt_idx] = self._optical(x[:, self.opt_idx], g)
        if self.sar_idx:
            out[:, self.sar_idx] = self._sar(x[:, self.sar_idx], g)
        return out


def make_view_transform(sensor: str, band_names: Sequence[str], input_size: int,
                        mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None,
                        augment: str = DEFAULT_AUGMENT) -> ViewTransform:
    """The augmentation pipeline the sensor calls for (see the module docstring), with the
    strengths of preset `augment`."""
    return ViewTransform(sensor, band_names, input_size, mean=mean, std=std,
                         params=augment_params(augment))


def two_views(transform: ViewTransform, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two independent random views of the same batch."""
    return transform(x, g), transform(x, g)
