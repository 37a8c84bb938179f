"""Folders of labelled image chips, class = folder name (EuroSAT RGB JPEGs, EuroSAT MS GeoTIFFs).

`<root>/<Class>/<chip>.{jpg,jpeg,png,tif,tiff}`; every chip becomes one small Scene with
`scene_classes=(class index,)`, classes being the sorted folder names. RGB chips (3 bands) map
to `s2 = {"R", "G", "B"}`; 13-band EuroSAT MS chips map to Sentinel-2 band names (B10, the L1C
cirrus band, is dropped; all bands are stored at 10 m).

Every chip is validated, not only the first per folder: GDAL opens each header and decodes the
last block (a whole 64x64 JPEG), with GDAL's sibling-file listing switched off
(GDAL_DISABLE_READDIR_ON_OPEN) because it would otherwise list the 3,000-file folder on every
open. That keeps the scan of all 27,000 EuroSAT RGB chips to a few seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess.readers.raster import BadScene, collect, gdal_config, probe, require_scenes
from preprocess.scene import BandSource, Scene, SceneSet

FMT = "chips"
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Chips have no side-car files: GDAL need not list the (large) class folder at every open.
READ_CONFIG = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


def find_chips(root: Path) -> list[tuple[str, Path]]:
    """(class name, chip path) for image files directly inside each class folder, sorted."""
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        for f in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if f.is_file() and f.name.lower().endswith(IMAGE_EXT):
                out.append((entry.name, Path(f.path)))
    return out


def band_map(count: int, path: Path) -> tuple[str, dict[str, int]]:
    """('rgb' | 'ms', band name -> 1-based index) for a chip with `count` bands."""
    if count in (3, 4):  # RGB or RGBA (alpha ignored)
        return "rgb", {name: i for i, name in enumerate(B.RGB_BANDS, start=1)}
    if count == len(B.EUROSAT_MS_ORDER):
        return "ms", {name: i for i, name in enumerate(B.EUROSAT_MS_ORDER, start=1)
                      if name in B.S2_BANDS}
    raise BadScene(path, f"{count} bands: expected 3 (RGB) or 13 (EuroSAT MS, B01..B12, B8A)")


def read(root: Path, *, skip_bad: bool = False, exclude: frozenset[str] = frozenset(),
         progress: bool = False) -> SceneSet:
    """Every chip under `root` (names '<Class>/<file stem>'), sorted by class then file name."""
    chips = find_chips(root)
    class_names = tuple(sorted({c for c, _ in chips}))  # before exclusion: stable indices
    index = {c: i for i, c in enumerate(class_names)}
    chips = [(c, p) for c, p in chips if f"{c}/{p.stem}" not in exclude and p.stem not in exclude]
    kinds: dict[str, str] = {}

    def build(item: tuple[str, Path]) -> Scene:
        cls, path = item
        info = probe(path)
        kind, names = band_map(info.count, path)
        kinds.setdefault(kind, str(path))
        gt = info.geotransform or (0.0, 10.0, 0.0, 0.0, 0.0, -10.0)
        return Scene(name=f"{cls}/{path.stem}", width=info.width, height=info.height,
                     crs_wkt=info.crs_wkt, geotransform=gt,
                     s2={n: BandSource(str(path), i, 10) for n, i in names.items()},
                     scene_classes=(index[cls],), nodata=None)  # black pixels are data in chips

    with gdal_config(**READ_CONFIG):
        scenes, skipped = collect(chips, build, skip_bad, progress, desc="chips")
    require_scenes(scenes, skipped, root, FMT, "expected <root>/<Class>/<chip>.jpg|.tif")
    if len(kinds) > 1:
        raise UserError(f"{root}: RGB and multispectral chips are mixed (e.g. {kinds['rgb']} and "
                        f"{kinds['ms']}); put them in separate input folders")
    kind = next(iter(kinds))
    s2_bands = B.RGB_BANDS if kind == "rgb" else B.S2_BANDS
    return SceneSet(scenes=scenes, class_names=class_names, fmt=FMT, s2_bands=s2_bands,
                    skipped=skipped)
