"""Synthetic Sentinel-1/-2 scenes as real georeferenced GeoTIFFs, deterministic by seed.

Why: the demo, the tests and the load-balancing benchmark need many scenes of very different sizes
with learnable land-cover classes, clouds and no-data, without a download. Every scene is drawn
from its own generator seeded by (seed, scene index), so scene i is the same whatever `--scenes`.

Rendering (`render_scene`) is pure numpy; `write_scene` turns the arrays into GeoTIFFs with GDAL.
Grid facts the tiler relies on: width and height are multiples of 60 px at 10 m so the 20 m and
60 m rasters cover exactly the same extent; no-data is painted on the 60 m grid and clouds on the
20 m grid (then replicated), so the 20 m SCL raster agrees pixel for pixel with the optical bands.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from hpcsrl.fileio import write_json
from hpcsrl.log import get_logger

MANIFEST = "manifest.json"
CLASSES_FILE = "classes.json"
MANIFEST_FORMAT = "hpcsrl-synth"
GRID_MULTIPLE = 60  # px at 10 m: the least common multiple of the 2x and 6x resolution steps
MIN_SIZE = 120  # one patch of the default size at least
LOOKS = 4.4  # equivalent number of looks of an IW GRD-HR product (gamma speckle shape)


@dataclass(frozen=True)
class LandCover:
    """A class as two spectral end-members mixed by a spatial field, plus SAR backscatter.

    Mixing two end-members (e.g. green crop and bare field per parcel) gives realistic within-class
    variability while keeping the class mean distinct from every other class.
    """

    name: str
    reflectance: tuple[float, ...]  # 12 values in S2_BANDS order
    alternate: tuple[float, ...]  # second end-member, same order
    mix_kind: str  # "smooth" (value noise) or "parcels" (piecewise-constant fields)
    mix_cell: int  # feature size of the mixing field in 10 m px
    mix_max: float  # largest share of the alternate end-member
    texture: float  # multiplicative brightness texture amplitude (fine grain)
    texture_cell: int
    sar_db: tuple[float, float]  # mean sigma0 VV, VH in dB
    sar_alt_db: tuple[float, float]  # shift of the alternate end-member, dB
    sar_texture_db: float
    scl: int  # the L2A scene-classification code of the clear class


# Signatures resemble published L2A surface-reflectance spectra; SAR means resemble C-band
# sigma0 averages by land cover. Order matters: `--classes K` takes the first K.
LAND_COVERS: tuple[LandCover, ...] = (
    LandCover("water",
              (.060, .050, .045, .030, .025, .020, .018, .015, .013, .008, .006, .004),
              (.075, .070, .080, .060, .050, .030, .025, .022, .020, .010, .008, .005),
              "smooth", 96, 0.5, 0.03, 8, (-21.0, -28.0), (4.0, 3.0), 0.8, B.SCL_WATER),
    LandCover("forest",
              (.025, .030, .050, .030, .080, .230, .290, .320, .330, .110, .160, .070),
              (.020, .022, .035, .020, .055, .150, .190, .210, .220, .075, .110, .045),
              "smooth", 40, 1.0, 0.10, 3, (-7.5, -13.0), (-0.8, -0.8), 1.0, B.SCL_VEGETATION),
    LandCover("cropland",
              (.040, .045, .080, .050, .130, .310, .380, .420, .430, .140, .220, .110),
              (.090, .100, .130, .170, .200, .220, .240, .260, .270, .090, .330, .270),
              "parcels", 36, 1.0, 0.04, 4, (-10.5, -17.0), (-2.0, -4.0), 0.8, B.SCL_VEGETATION),
    LandCover("urban",
              (.100, .100, .110, .120, .140, .160, .170, .180, .190, .070, .220, .190),
              (.160, .170, .190, .210, .230, .240, .250, .260, .265, .090, .280, .250),
              "smooth", 3, 1.0, 0.20, 2, (-4.0, -11.0), (3.0, 2.0), 2.5, B.SCL_NOT_VEGETATED),
    LandCover("bare_soil",
              (.100, .110, .150, .200, .230, .250, .270, .280, .300, .100, .360, .300),
              (.150, .170, .220, .280, .310, .330, .340, .350, .360, .120, .420, .360),
              "smooth", 64, 0.8, 0.06, 6, (-13.5, -22.0), (-4.0, -3.0), 1.0, B.SCL_NOT_VEGETATED),
    LandCover("grassland",
              (.045, .050, .085, .070, .130, .240, .280, .300, .310, .100, .260, .150),
              (.060, .070, .100, .110, .160, .210, .230, .250, .260, .090, .300, .210),
              "smooth", 16, 1.0, 0.05, 3, (-11.5, -18.5), (-1.0, -1.5), 0.8, B.SCL_VEGETATION),
    LandCover("wetland",
              (.040, .040, .060, .050, .090, .150, .180, .200, .200, .070, .120, .060),
              (.055, .050, .050, .035, .030, .030, .030, .030, .028, .012, .012, .008),
              "smooth", 10, 0.6, 0.06, 4, (-9.0, -17.0), (3.0, -1.5), 1.2, B.SCL_VEGETATION),
    LandCover("shrubland",
              (.060, .060, .080, .090, .130, .190, .220, .240, .250, .080, .270, .180),
              (.070, .075, .100, .120, .160, .200, .220, .235, .245, .080, .300, .220),
              "smooth", 6, 1.0, 0.08, 2, (-9.5, -15.5), (-1.0, -1.5), 1.0, B.SCL_VEGETATION),
)
# Thick cloud top-of-canopy-like reflectance per band (bright, flat in the visible, lower in SWIR).
CLOUD_REFLECTANCE = np.array(
    [.50, .48, .47, .46, .47, .48, .48, .50, .50, .30, .36, .26], dtype=np.float32)


@dataclass(frozen=True)
class SynthConfig:
    """All generation parameters; the manifest stores them so a re-run can resume safely."""

    scenes: int = 8
    size: int = 1200
    size_spread: float = 0.8
    classes: int = 6
    seed: int = 0
    layout: str = "per-band"  # or "per-resolution"
    s1: bool = True
    cloud_fraction: float = 0.1
    nodata_fraction: float = 0.05
    compress: str = "none"  # GeoTIFF compression: none | deflate | lzw

    def validate(self) -> None:
        """Reject options that cannot produce a valid scene set (names the option)."""
        if self.scenes < 1:
            raise UserError("--scenes must be at least 1")
        if self.size < MIN_SIZE:
            raise UserError(f"--size must be at least {MIN_SIZE} px")
        if not 1 <= self.classes <= len(LAND_COVERS):
            raise UserError(f"--classes must be between 1 and {len(LAND_COVERS)} "
                            f"({', '.join(c.name for c in LAND_COVERS)})")
        if self.size_spread < 0:
            raise UserError("--size-spread must be >= 0")
        if self.layout not in ("per-band", "per-resolution"):
            raise UserError("--layout must be per-band or per-resolution")
        for opt, v in (("--cloud-fraction", self.cloud_fraction),
                       ("--nodata-fraction", self.nodata_fraction)):
            if not 0.0 <= v < 1.0:
                raise UserError(f"{opt} must be in [0, 1)")
        if self.compress not in ("none", "deflate", "lzw"):
            raise UserError("--compress must be none, deflate or lzw")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in LAND_COVERS[: self.classes]]


@dataclass
class RenderedScene:
    """Arrays of one scene, ready to be written (S2 as uint16 DN at native resolution)."""

    name: str
    epsg: int
    geotransform: tuple[float, ...]  # of the 10 m grid
    s2: dict[str, np.ndarray]
    scl: np.ndarray  # uint8, 20 m
    label: np.ndarray  # uint8, 10 m
    s1: dict[str, np.ndarray] = field(default_factory=dict)  # float32 dB, 10 m
    stats: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.label.shape[0])

    @property
    def width(self) -> int:
        return int(self.label.shape[1])


# ---------------------------------------------------------------- noise fields (pure numpy)


def _lerp_axis(coarse: np.ndarray, n: int, cell: float, offset: float, axis: int) -> np.ndarray:
    """Smoothstep interpolation of `coarse` along `axis` to `n` samples spaced 1/cell apart."""
    pos = np.arange(n, dtype=np.float32) / np.float32(cell) + np.float32(offset)
    i0 = np.floor(pos).astype(np.intp)
    t = pos - i0
    t = t * t * (3 - 2 * t)
    a = np.take(coarse, i0, axis=axis)
    b = np.take(coarse, i0 + 1, axis=axis)
    shape = [1, 1]
    shape[axis] = n
    t = t.reshape(shape)
    b -= a  # in place: these arrays are scene-sized, temporaries cost more than the maths
    b *= t
    b += a
    return b


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean noise (unit std on the lattice) with features about `cell` px wide."""
    cell = max(float(cell), 1.0)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    oy, ox = rng.random(2, dtype=np.float32)  # random phase: lattice lines are not scene-aligned
    # Columns first on the small lattice, then rows: the full-size pass gathers whole rows.
    cols = _lerp_axis(coarse, w, cell, float(ox), axis=1)
    return _lerp_axis(cols, h, cell, float(oy), axis=0)


def fractal_noise(rng: np.random.Generator, h: int, w: int, cell: float,
                  octaves: int = 3) -> np.ndarray:
    """Sum of value-noise octaves (each half the size and amplitude), normalised to unit std."""
    out = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for k in range(octaves):
        out += np.float32(amp) * value_noise(rng, h, w, cell / 2**k)
        total += amp * amp
        amp *= 0.5
    out /= np.float32(math.sqrt(total))
    return out


def parcels(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Piecewise-constant rectangles of about `cell` px with uniform values in [0, 1) (fields)."""
    ch = max(2, int(cell * rng.uniform(0.7, 1.3)))
    cw = max(2, int(cell * rng.uniform(0.7, 1.3)))
    oy, ox = int(rng.integers(ch)), int(rng.integers(cw))
    grid = rng.random((h // ch + 2, w // cw + 2), dtype=np.float32)
    rows = (np.arange(h) + oy) // ch
    cols = (np.arange(w) + ox) // cw
    return grid[rows[:, None], cols[None, :]]


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Average k x k blocks (a coarser sensor integrates the finer grid); shape must divide."""
    h, w = a.shape
    return a.reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)


def upsample(a: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour replication by k (coarse masks onto the finer grid, exactly aligned)."""
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


# ---------------------------------------------------------------- scene rendering (pure numpy)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per scene: scene i does not depend on how many scenes are made."""
    return np.random.default_rng([seed, index])


def scene_name(seed: int, index: int) -> str:
    return f"synth{seed}_{index:04d}"


def size_quantile(seed: int, index: int) -> float:
    """Quantile in (0, 1) of scene `index`'s size: a golden-ratio sequence with a per-seed phase.

    Any run of consecutive scenes covers the size distribution evenly (independent draws can
    leave 8 scenes all near the median), yet scene i still depends only on (seed, i).
    """
    phase = float(np.random.default_rng([seed, 2**31 - 1]).random())
    u = (phase + index * 0.6180339887498949) % 1.0
    return min(max(u, 1e-4), 1 - 1e-4)


def draw_size(rng: np.random.Generator, size: int, spread: float,
              quantile: float | None = None) -> tuple[int, int]:
    """(height, width): log-normal around `size` (sigma = spread), mild aspect jitter, 60-px grid.

    `quantile` fixes the log-normal quantile (see `size_quantile`); None draws it from `rng`.
    Clamped to [120, 3 * size] so one scene cannot exhaust memory.
    """
    z = rng.standard_normal() if quantile is None else NormalDist().inv_cdf(quantile)
    side = size * math.exp(spread * z)
    aspect = math.exp(0.15 * rng.standard_normal())
    h, w = side / math.sqrt(aspect), side * math.sqrt(aspect)

    def snap(v: float) -> int:
        v = min(max(v, MIN_SIZE), 3 * size)
        return max(MIN_SIZE, int(round(v / GRID_MULTIPLE)) * GRID_MULTIPLE)

    return snap(h), snap(w)


def draw_geometry(rng: np.random.Generator, h: int, w: int) -> tuple[int, tuple[float, ...]]:
    """A European UTM zone and a 60 m-aligned upper-left corner inside the zone's false easting."""
    zone = int(rng.integers(29, 38))
    x_max = max(166_000 + 60, 834_000 - w * 10)
    x0 = 60.0 * int(rng.integers(166_000 // 60, x_max // 60))
    y0 = 60.0 * int(rng.integers(4_400_000 // 60, 6_600_000 // 60))
    return 32600 + zone, (x0, 10.0, 0.0, y0, 0.0, -10.0)


def class_map(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """Smooth regions (argmax of K low-frequency fields) with scene-specific class proportions.

    The region scale (~250 px) makes a 120 px patch mostly one class while a scene holds several.
    Fields are drawn on the 20 m grid (4x cheaper; boundaries then follow 20 m pixels).
    """
    h2, w2 = h // 2, w // 2
    bias = 0.6 * rng.standard_normal(k).astype(np.float32)  # some classes dominate some scenes
    best = np.full((h2, w2), -np.inf, dtype=np.float32)
    cls = np.zeros((h2, w2), dtype=np.uint8)
    for c in range(k):
        f = fractal_noise(rng, h2, w2, 125.0, octaves=3) + bias[c]
        better = f > best
        cls[better] = c
        np.maximum(best, f, out=best)
    return upsample(cls, 2)


def nodata_mask60(rng: np.random.Generator, h60: int, w60: int, mean_fraction: float) -> np.ndarray:
    """No-data on the 60 m grid: a swath-edge corner triangle or an edge strip, or nothing."""
    mask = np.zeros((h60, w60), dtype=bool)
    if mean_fraction <= 0:
        return mask
    frac = min(0.6, float(rng.exponential(mean_fraction)))
    if frac < 0.01:
        return mask
    yy, xx = np.mgrid[0:h60, 0:w60]
    u, v = (xx + 0.5) / w60, (yy + 0.5) / h60
    if rng.random() < 0.5:  # corner triangle with area frac: legs a = sqrt(2 frac)
        a = math.sqrt(2 * frac)
        if rng.random() < 0.5:
            u = 1 - u
        if rng.random() < 0.5:
            v = 1 - v
        mask = (u + v) < a
    else:  # strip along one edge
        edge = int(rng.integers(4))
        coord = (u, 1 - u, v, 1 - v)[edge]
        mask = coord < frac
    return mask


def cloud_alpha20(rng: np.random.Generator, h20: int, w20: int, mean_fraction: float) -> np.ndarray:
    """Cloud opacity in [0, 1] on the 20 m grid: soft-edged blobs covering ~a random fraction."""
    alpha = np.zeros((h20, w20), dtype=np.float32)
    if mean_fraction <= 0:
        return alpha
    frac = min(0.9, float(rng.gamma(1.0, mean_fraction)))
    if frac < 0.005:
        return alpha
    f = fractal_noise(rng, h20, w20, 60.0, octaves=4)
    thr = np.quantile(f, 1.0 - frac)
    return np.clip((f - thr) / 0.8, 0.0, 1.0).astype(np.float32)


def render_scene(cfg: SynthConfig, index: int) -> RenderedScene:
    """All rasters of scene `index` (deterministic in (cfg.seed, index) and the class options)."""
    rng = scene_rng(cfg.seed, index)
    h, w = draw_size(rng, cfg.size, cfg.size_spread, size_quantile(cfg.seed, index))
    epsg, gt = draw_geometry(rng, h, w)
    covers = LAND_COVERS[: cfg.classes]
    k = len(covers)
    cls = class_map(rng, h, w, k)

    # Per-pixel end-member mix and brightness texture, drawn per class on the class's own scale.
    mix = np.zeros((h, w), dtype=np.float32)
    tex = np.zeros((h, w), dtype=np.float32)
    sar_tex = np.zeros((h, w), dtype=np.float32)
    for c, lc in enumerate(covers):
        sel = cls == c
        if not sel.any():
            continue
        if lc.mix_kind == "parcels":
            m = parcels(rng, h, w, lc.mix_cell)
        else:
            m = np.clip(0.5 + 0.35 * value_noise(rng, h, w, lc.mix_cell), 0.0, 1.0)
        mix[sel] = lc.mix_max * m[sel]
        tex[sel] = lc.texture * value_noise(rng, h, w, lc.texture_cell)[sel]
        sar_tex[sel] = lc.sar_texture_db * value_noise(rng, h, w, max(2, lc.texture_cell))[sel]

    refl = np.array([lc.reflectance for lc in covers], dtype=np.float32)  # (k, 12)
    alt = np.array([lc.alternate for lc in covers], dtype=np.float32)

    # Atmosphere and quality masks on coarse grids, replicated so every grid agrees exactly.
    nodata60 = nodata_mask60(rng, h // 6, w // 6, cfg.nodata_fraction)
    alpha20 = cloud_alpha20(rng, h // 2, w // 2, cfg.cloud_fraction)
    cloudy20 = alpha20 > 0
    dy, dx = (int(v) for v in rng.integers(8, 25, size=2))  # shadow offset (20 m px), sun to SE
    shadow20 = np.zeros_like(cloudy20)
    shadow20[dy:, dx:] = alpha20[:-dy, :-dx] >= 0.25
    shadow20 &= ~cloudy20
    nodata20 = upsample(nodata60, 3)
    alpha10 = upsample(alpha20, 2)
    shade10 = np.where(upsample(shadow20, 2), np.float32(0.45), np.float32(1.0))
    nodata10 = upsample(nodata60, 6)
    cloud_tex = 1.0 + 0.15 * value_noise(rng, h, w, 12)

    s2: dict[str, np.ndarray] = {}
    bright = (1.0 + tex) * shade10 * (1.0 - alpha10)
    for b_i, band in enumerate(B.S2_BANDS):
        r = refl[:, b_i][cls]
        r += (alt[:, b_i][cls] - r) * mix
        r *= bright
        r += (CLOUD_REFLECTANCE[b_i] * alpha10) * cloud_tex
        res = B.S2_RESOLUTION_M[band]
        if res > 10:
            r = block_mean(r, res // 10)
        r += np.float32(0.002) * rng.standard_normal(r.shape, dtype=np.float32)  # sensor noise
        dn = np.clip(np.rint(r * B.S2_QUANTIFICATION), 1, 65535).astype(np.uint16)
        dn[nodata10[:: res // 10, :: res // 10]] = B.S2_NODATA
        s2[band] = dn

    scl_lut = np.array([lc.scl for lc in covers], dtype=np.uint8)
    scl = scl_lut[cls[::2, ::2]]
    scl[shadow20] = B.SCL_CLOUD_SHADOW
    scl[cloudy20 & (alpha20 < 0.2)] = B.SCL_CIRRUS
    scl[(alpha20 >= 0.2) & (alpha20 < 0.5)] = B.SCL_CLOUD_MEDIUM
    scl[alpha20 >= 0.5] = B.SCL_CLOUD_HIGH
    scl[nodata20] = B.SCL_NO_DATA

    s1: dict[str, np.ndarray] = {}
    if cfg.s1:
        urban = [i for i, lc in enumerate(covers) if lc.name == "urban"]
        points = np.zeros((h, w), dtype=bool)
        if urban:  # strong point scatterers (corners of buildings)
            points = (cls == urban[0]) & (rng.random((h, w), dtype=np.float32) < 0.03)
        for p_i, pol in enumerate(B.S1_BANDS):
            mu = np.array([lc.sar_db[p_i] for lc in covers], dtype=np.float32)
            shift = np.array([lc.sar_alt_db[p_i] for lc in covers], dtype=np.float32)
            db = mu[cls] + shift[cls] * mix + sar_tex
            db[points] += 10.0 if pol == "VV" else 5.0  # double bounce is mostly co-polar
            power = np.power(np.float32(10.0), db / np.float32(10.0))
            power *= rng.standard_gamma(LOOKS, size=(h, w), dtype=np.float32) / np.float32(LOOKS)
            s1[pol] = (10.0 * np.log10(np.maximum(power, 1e-6))).astype(np.float32)

    stats = {
        "class_fractions": [round(float(v), 4) for v in np.bincount(cls.ravel(), minlength=k)
                            / cls.size],
        "cloud_fraction": round(float(cloudy20.mean()), 4),
        "shadow_fraction": round(float(shadow20.mean()), 4),
        "nodata_fraction": round(float(nodata60.mean()), 4),
    }
    return RenderedScene(scene_name(cfg.seed, index), epsg, gt, s2, scl, cls, s1, stats)


# ---------------------------------------------------------------- GeoTIFF output (GDAL)


def _creation_options(compress: str) -> list[str]:
    # Tiled: the tiler reads 120-px windows; a striped file would decode whole strips per window.
    opts = ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256"]
    if compress == "deflate":
        opts += ["COMPRESS=DEFLATE", "PREDICTOR=2", "ZLEVEL=1"]
    elif compress == "lzw":
        opts += ["COMPRESS=LZW", "PREDICTOR=2"]
    return opts


def write_geotiff(path: Path, arrays: list[np.ndarray], names: list[str],
                  geotransform: tuple[float, ...], crs_wkt: str, compress: str = "none",
                  nodata: float | None = None) -> None:
    """One (multi-band) GeoTIFF; band descriptions carry the band names for the readers."""
    from osgeo import gdal, gdal_array

    gdal.UseExceptions()
    h, w = arrays[0].shape
    gtype = gdal_array.NumericTypeCodeToGDALTypeCode(arrays[0].dtype)
    drv = gdal.GetDriverByName("GTiff")
    ds = drv.Create(str(path), w, h, len(arrays), gtype, options=_creation_options(compress))
    ds.SetGeoTransform(geotransform)
    ds.SetProjection(crs_wkt)
    for i, (a, name) in enumerate(zip(arrays, names, strict=True), start=1):
        band = ds.GetRasterBand(i)
        band.SetDescription(name)
        if nodata is not None:
            band.SetNoDataValue(nodata)
        band.WriteArray(a)
    ds.FlushCache()
    ds = None  # noqa: F841  (closing the dataset writes the file)


def scaled_geotransform(gt: tuple[float, ...], factor: int) -> tuple[float, ...]:
    """Geotransform of the same extent with pixels `factor` times larger."""
    return (gt[0], gt[1] * factor, gt[2], gt[3], gt[4], gt[5] * factor)


def write_scene(scene: RenderedScene, folder: Path, layout: str, compress: str) -> None:
    """Write every raster of `scene` into `folder` (which must exist)."""
    from osgeo import osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(scene.epsg)
    wkt = srs.ExportToWkt()
    n = scene.name
    if layout == "per-band":
        for band, dn in scene.s2.items():
            gt = scaled_geotransform(scene.geotransform, B.S2_RESOLUTION_M[band] // 10)
            write_geotiff(folder / f"{n}_{band}.tif", [dn], [band], gt, wkt, compress, 0)
    else:
        for res, names in B.S2_BY_RESOLUTION.items():
            gt = scaled_geotransform(scene.geotransform, res // 10)
            write_geotiff(folder / f"{n}_R{res}m.tif", [scene.s2[b] for b in names], list(names),
                          gt, wkt, compress, 0)
    write_geotiff(folder / f"{n}_SCL.tif", [scene.scl], ["SCL"],
                  scaled_geotransform(scene.geotransform, 2), wkt, compress)
    write_geotiff(folder / f"{n}_label.tif", [scene.label], ["label"], scene.geotransform, wkt,
                  compress)
    for pol, db in scene.s1.items():
        write_geotiff(folder / f"{n}_{pol}.tif", [db], [pol], scene.geotransform, wkt, compress)


@dataclass
class SynthResult:
    """What a run produced: per-scene manifest entries, and which scenes were already there."""

    scenes: list[dict]
    reused: list[str]


def _manifest_params(cfg: SynthConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "compress"}


def _check_existing(out: Path, cfg: SynthConfig, force: bool) -> dict[str, dict]:
    """Scenes of a previous run with the same parameters (kept), or a UserError on a conflict."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}); delete it or use --force") from exc
    same = old.get("params") == _manifest_params(cfg)
    if force or not same:
        if not force:
            raise UserError(f"{out} holds scenes made with other parameters ({path}); "
                            "use another --out or --force to replace them")
        for entry in old.get("scenes", []):
            shutil.rmtree(out / entry["name"], ignore_errors=True)
        path.unlink()
        return {}
    return {e["name"]: e for e in old.get("scenes", [])}


def _scene_complete(folder: Path, name: str, cfg: SynthConfig) -> bool:
    if not folder.is_dir():
        return False
    expected = (list(B.S2_BANDS) if cfg.layout == "per-band" else ["R10m", "R20m", "R60m"])
    expected += ["SCL", "label"] + (list(B.S1_BANDS) if cfg.s1 else [])
    return all((folder / f"{name}_{e}.tif").is_file() for e in expected)


def _remove_stale_temps(out: Path) -> None:
    """Temp folders of killed runs (`.<scene>.<pid>.tmp`) are never valid scenes: delete them."""
    for p in out.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def iter_generate(out: Path, cfg: SynthConfig, force: bool = False) -> Iterator[tuple[dict, bool]]:
    """Generate the scene set into `out`, yielding (manifest entry, reused) per scene.

    Each scene is written into a hidden temp folder and renamed into place, so a killed run
    leaves only complete scenes; a re-run with the same parameters keeps them (resume).
    """
    cfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    previous = _check_existing(out, cfg, force)
    for i in range(cfg.scenes):
        name = scene_name(cfg.seed, i)
        final = out / name
        if name in previous and _scene_complete(final, name, cfg):
            yield previous[name], True
            continue
        scene = render_scene(cfg, i)
        tmp = out / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_scene(scene, tmp, cfg.layout, cfg.compress)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        entry = {"name": name, "width": scene.width, "height": scene.height,
                 "epsg": scene.epsg, "geotransform": list(scene.geotransform), **scene.stats}
        yield entry, False


def generate(out: str | os.PathLike, cfg: SynthConfig, force: bool = False,
             command: str | None = None, progress: bool = False) -> SynthResult:
    """Generate all scenes, then write classes.json and manifest.json (atomically, last)."""
    from hpcsrl.progress import progress_bar

    out = Path(out)
    log = get_logger("hpcsrl.synth")
    entries: list[dict] = []
    reused: list[str] = []
    it = iter_generate(out, cfg, force)
    bar = progress_bar(it, total=cfg.scenes, unit="scene", disable=not progress, desc="synth")
    for entry, was_reused in bar:
        entries.append(entry)
        if was_reused:
            reused.append(entry["name"])
    write_json(out / CLASSES_FILE, cfg.class_names)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "params": _manifest_params(cfg),
        "classes": cfg.class_names,
        "s2_bands": list(B.S2_BANDS),
        "s1_bands": list(B.S1_BANDS) if cfg.s1 else [],
        "command": command if command is not None else " ".join(sys.argv),
        "scenes": entries,
    }
    write_json(out / MANIFEST, manifest)
    if reused:
        log.info("kept %d complete scene(s) from an earlier run", len(reused))
    return SynthResult(entries, reused)
