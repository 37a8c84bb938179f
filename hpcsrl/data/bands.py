"""Sentinel-2 / Sentinel-1 band tables: names, native resolutions, storage order, typical values.

One place for sensor facts so the generator, the readers, the tiler and the dataset agree on band
order. Orders here are the orders of the HDF5 datasets documented in preprocess/SCHEMA.md.
No numpy / GDAL / torch imports: every rank and every tool can import this cheaply.
"""

from __future__ import annotations

import re

# --- Sentinel-2 MSI (L2A has no B10: the cirrus band is only in L1C) ---------------------------

S2_10M: tuple[str, ...] = ("B02", "B03", "B04", "B08")
S2_20M: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
S2_60M: tuple[str, ...] = ("B01", "B09")
# `data_super` order: spectral order, as in the ESA product and in BigEarthNet.
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
S2_RESOLUTION_M: dict[str, int] = {
    **{b: 10 for b in S2_10M}, **{b: 20 for b in S2_20M}, **{b: 60 for b in S2_60M}, "B10": 60,
}
# Bands grouped by the HDF5 dataset that stores them at native resolution.
S2_BY_RESOLUTION: dict[int, tuple[str, ...]] = {10: S2_10M, 20: S2_20M, 60: S2_60M}

# Central wavelengths (nm, Sentinel-2A), handy for plots and for sanity checks of signatures.
S2_WAVELENGTH_NM: dict[str, int] = {
    "B01": 443, "B02": 490, "B03": 560, "B04": 665, "B05": 705, "B06": 740, "B07": 783,
    "B08": 842, "B8A": 865, "B09": 945, "B10": 1375, "B11": 1610, "B12": 2190,
}

# L2A surface reflectance is stored as DN = reflectance * 10000 (after BOA_ADD_OFFSET since
# processing baseline 04.00). 0 is the no-data value.
S2_QUANTIFICATION = 10000
S2_NODATA = 0
# Plausible clear-sky surface reflectance per band over land and water (min, max). Values
# outside are rare (clouds and snow exceed the max; dark water can touch the min).
S2_REFLECTANCE_RANGE: dict[str, tuple[float, float]] = {
    "B01": (0.0, 0.35), "B02": (0.0, 0.35), "B03": (0.0, 0.40), "B04": (0.0, 0.45),
    "B05": (0.0, 0.50), "B06": (0.0, 0.60), "B07": (0.0, 0.65), "B08": (0.0, 0.70),
    "B8A": (0.0, 0.70), "B09": (0.0, 0.40), "B11": (0.0, 0.60), "B12": (0.0, 0.55),
}

# EuroSAT multispectral chips: 13 bands stacked B01..B12 then B8A (all resampled to 10 m).
EUROSAT_MS_ORDER: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)
# RGB chips (EuroSAT RGB JPEGs): their channels correspond to these Sentinel-2 bands.
RGB_BANDS: tuple[str, ...] = ("R", "G", "B")
RGB_TO_S2: dict[str, str] = {"R": "B04", "G": "B03", "B": "B02"}

_S2_NAME = re.compile(r"^B0?(1[0-2]|[1-9]|8A)$", re.IGNORECASE)


def normalise_s2_name(token: str) -> str | None:
    """'B2', 'b02', 'B8a' -> 'B02', 'B02', 'B8A'; None when `token` is not an S2 band name.

    Data sets spell band names differently (SSL4EO-S12 writes B2.tif, BigEarthNet _B02.tif).
    """
    m = _S2_NAME.match(token)
    if not m:
        return None
    num = m.group(1).upper()
    return "B8A" if num == "8A" else f"B{int(num):02d}"


# --- Sentinel-2 L2A scene classification (SCL) ---------------------------------------------------

SCL_NO_DATA = 0
SCL_SATURATED = 1
SCL_DARK = 2
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_UNCLASSIFIED = 7
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_CIRRUS = 10
SCL_SNOW = 11
SCL_RESOLUTION_M = 20
# Pixels that must not count as clear land when filtering patches.
SCL_INVALID: frozenset[int] = frozenset(
    {SCL_NO_DATA, SCL_SATURATED, SCL_CLOUD_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS}
)

# --- Sentinel-1 C-band SAR (IW GRD) --------------------------------------------------------------

S1_BANDS: tuple[str, ...] = ("VV", "VH")
S1_RESOLUTION_M = 10
# Typical sigma0 in dB over land and water; VH (cross-pol) is ~6-8 dB below VV.
S1_DB_RANGE: dict[str, tuple[float, float]] = {"VV": (-30.0, 10.0), "VH": (-38.0, 5.0)}


def band_resolutions(bands: tuple[str, ...] | list[str]) -> list[int]:
    """Native resolution in metres for each band name (S2, S1 or RGB; RGB chips are 10 m)."""
    return [S2_RESOLUTION_M.get(b, 10) for b in bands]
