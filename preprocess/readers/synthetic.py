"""Folders of per-band or per-resolution GeoTIFFs: the `hpcsrl synth` layout, and alike.

A scene is a folder holding `<scene>_B02.tif ...` (one file per band, BigEarthNet style) or
`<scene>_R10m.tif`, `_R20m.tif`, `_R60m.tif` (bands named by their descriptions), optionally
`<scene>_SCL.tif`, `<scene>_label.tif`, `<scene>_VV.tif`, `<scene>_VH.tif`. The `<scene>_` prefix
is optional, so Major-TOM cells (`<cell>/<product>/B01.tif`) and SSL4EO-S12 folders (`B2.tif`)
read the same way; their scene name is the folder path relative to the input folder.
Class names come from `classes.json` (a JSON list) next to the scenes, when label rasters exist.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess.readers.raster import BadScene, collect, probe, require_scenes, s2_scene, walk
from preprocess.scene import SceneSet

FMT = "synthetic"
BAND_FILE = re.compile(
    r"^(?:(?P<prefix>.*)_)?(?P<key>B0?\d{1,2}|B8A|R(?:10|20|60)m|SCL|VV|VH|label)\.tiff?$",
    re.IGNORECASE)
RES_FILE = re.compile(r"^R(10|20|60)m$", re.IGNORECASE)
# A Major-TOM grid cell folder, e.g. 0U_199R: row (U/D of the equator) and column (L/R).
MAJORTOM_CELL = re.compile(r"^\d+[UD]_\d+[LR]$")


@dataclass
class FileGroup:
    """The raster files of one candidate scene (same folder, same file-name prefix)."""

    folder: Path
    name: str
    bands: dict[str, str] = field(default_factory=dict)  # S2 band -> per-band file
    per_res: dict[int, str] = field(default_factory=dict)  # 10/20/60 -> multi-band file
    s1: dict[str, str] = field(default_factory=dict)
    scl: str | None = None
    label: str | None = None

    @property
    def has_s2(self) -> bool:
        return bool(self.bands or self.per_res)


def scan_groups(root: Path) -> list[FileGroup]:
    """Walk `root` (hidden folders skipped) and group band files by (folder, prefix)."""
    groups: dict[tuple[str, str], FileGroup] = {}
    for folder, _, filenames in walk(root):
        for fn in filenames:
            m = BAND_FILE.match(fn)
            if not m:
                continue
            prefix = m.group("prefix") or ""
            key = m.group("key")
            if prefix:
                name = prefix
            else:
                rel = folder.relative_to(root).as_posix()
                name = folder.name if rel == "." else rel
            g = groups.setdefault((str(folder), prefix), FileGroup(folder, name))
            path = str(folder / fn)
            band = B.normalise_s2_name(key)
            res = RES_FILE.match(key)
            if band is not None:
                g.bands[band] = path
            elif res:
                g.per_res[int(res.group(1))] = path
            elif key.upper() in B.S1_BANDS:
                g.s1[key.upper()] = path
            elif key.upper() == "SCL":
                g.scl = path
            else:
                g.label = path
    return [g for _, g in sorted(groups.items())]


def _per_res_bands(group: FileGroup) -> dict[str, tuple[str, int]]:
    """Map S2 band names to (file, band index) in per-resolution files via band descriptions."""
    out: dict[str, tuple[str, int]] = {}
    for res, path in sorted(group.per_res.items()):
        info = probe(path, read_check=False)
        names = [B.normalise_s2_name(d.strip()) for d in info.descriptions]
        if not all(names):
            expected = B.S2_BY_RESOLUTION[res]
            if info.count != len(expected):
                raise BadScene(path, f"{info.count} bands without S2 band descriptions; expected "
                                     f"{len(expected)} ({' '.join(expected)})")
            names = list(expected)
        for i, n in enumerate(names, start=1):
            out[n] = (path, i)
    return out


def read_class_names(root: Path) -> tuple[str, ...]:
    """classes.json (a JSON list of names) or the synth manifest's "classes"; () when absent."""
    for fn, key in (("classes.json", None), ("manifest.json", "classes")):
        p = root / fn
        if not p.is_file():
            continue
        try:
            obj = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{p}: not valid JSON ({exc})") from exc
        names = obj.get(key) if key and isinstance(obj, dict) else obj
        if names is None and key:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{p}: expected a JSON list of class names")
        return tuple(names)
    return ()


def read(root: Path, *, skip_bad: bool = False, exclude: frozenset[str] = frozenset(),
         progress: bool = False, fmt: str = FMT) -> SceneSet:
    """All per-band / per-resolution scenes under `root`, sorted by name; `fmt` is the layout
    recorded in the output (`synthetic`, or `majortom` for Major-TOM cells)."""
    groups = [g for g in scan_groups(root) if g.has_s2 and g.name not in exclude]
    want_s1 = any(g.s1 for g in groups)
    class_names = read_class_names(root)
    if any(g.label for g in groups) and not class_names:
        raise UserError(f"{root}: scenes have label rasters but there is no classes.json "
                        "(a JSON list of class names) in that folder")

    def build(g: FileGroup):
        band_files = {b: (p, 1) for b, p in g.bands.items()}
        band_files.update(_per_res_bands(g))
        band_files = {b: v for b, v in band_files.items() if b in B.S2_BANDS}  # L1C B10 dropped
        missing_s1 = [p for p in B.S1_BANDS if want_s1 and p not in g.s1]
        if missing_s1:
            raise BadScene(g.folder, f"missing Sentinel-1 band(s) {', '.join(missing_s1)} "
                                     "(other scenes have them)")
        return s2_scene(g.name, band_files, B.S2_BANDS, s1_files=g.s1, scl=g.scl,
                        label=g.label, folder=str(g.folder))

    scenes, skipped = collect(groups, build, skip_bad, progress, desc=fmt)
    require_scenes(scenes, skipped, root, fmt,
                   "expected folders with <scene>_B02.tif ... or <scene>_R10m.tif")
    return SceneSet(scenes=scenes, class_names=class_names, fmt=fmt, s2_bands=B.S2_BANDS,
                    s1_bands=B.S1_BANDS if want_s1 else (), skipped=skipped)
