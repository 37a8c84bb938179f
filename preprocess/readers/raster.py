"""Cheap GDAL checks shared by the readers: probe a raster, compare grids, assemble band scenes.

Why cheap: a reader runs before any tiling and may see hundreds of thousands of files, so it only
opens headers and reads the bottom-right pixel of every band. That pixel lives in the last
tile/strip, which is at the end of a GeoTIFF written in order, so a truncated copy fails there.
Problems are raised as `BadScene(path, reason)`; `collect` turns them into a `UserError` naming the
file, or into `SceneSet.skipped` entries with `skip_bad`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from osgeo import gdal, osr

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess.scene import BandSource, Scene

gdal.UseExceptions()

T = TypeVar("T")


class BadScene(Exception):
    """One scene cannot be used: `path` is the offending file (or folder), `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@contextlib.contextmanager
def gdal_config(**options: str) -> Iterator[None]:
    """Set GDAL config options for the block and restore the previous values afterwards."""
    old = {k: gdal.GetConfigOption(k) for k in options}
    for k, v in options.items():
        gdal.SetConfigOption(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            gdal.SetConfigOption(k, v)


def walk(root: Path, max_depth: int | None = None) -> Iterator[tuple[Path, list[str], list[str]]]:
    """`os.walk` in sorted order, hidden folders (temp output) skipped, optionally depth-limited.

    Callers may `.clear()` the yielded folder list to stop descending below a folder.
    """
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if max_depth is not None and len(Path(dirpath).parts) - base >= max_depth:
            dirnames.clear()
        yield Path(dirpath), dirnames, sorted(filenames)


@dataclass(frozen=True)
class RasterInfo:
    """What the header says about one raster file."""

    path: str
    width: int
    height: int
    count: int
    dtype: str  # GDAL data type name, e.g. UInt16
    geotransform: tuple[float, ...] | None  # None when the file has no geotransform
    crs_wkt: str
    descriptions: tuple[str, ...]
    gcp_count: int = 0

    @property
    def pixel_size(self) -> float:
        return abs(self.geotransform[1]) if self.geotransform else 1.0


# Results of `probe(path)` computed ahead, e.g. by other MPI ranks (see `prefetched`).
_AHEAD: dict[str, RasterInfo | tuple[str, str]] = {}


def probe_many(paths: Iterable[str]) -> dict[str, RasterInfo | tuple[str, str]]:
    """`probe(path)` of each path: its RasterInfo, or (path, reason) of its BadScene. Never
    raises: an unexpected failure leaves the path out, for `probe` to meet it again."""
    out: dict[str, RasterInfo | tuple[str, str]] = {}
    for path in paths:
        try:
            out[path] = probe(path)
        except BadScene as bad:
            out[path] = (bad.path, bad.reason)
        except Exception:  # noqa: BLE001, S112 - probed again (and reported) by the reader
            continue
    return out


@contextlib.contextmanager
def prefetched(results: dict[str, RasterInfo | tuple[str, str]]) -> Iterator[None]:
    """Within the block, `probe(path)` answers from `results` (each at most once) instead of
    opening the file again; probing is most of a reader's time (the CRS of every file)."""
    _AHEAD.update(results)
    try:
        yield
    finally:
        _AHEAD.clear()


def probe(path: str | os.PathLike, read_check: bool = True) -> RasterInfo:
    """Open `path` read-only, read its header and (by default) the bottom-right pixel per band.

    Nothing is written next to the input (no statistics, so no .aux.xml side-car files).
    """
    path = str(path)
    if read_check and path in _AHEAD:
        ahead = _AHEAD.pop(path)
        if isinstance(ahead, RasterInfo):
            return ahead
        raise BadScene(*ahead)
    try:
        ds = gdal.Open(path, gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise BadScene(path, f"GDAL cannot open it ({_short(exc, path)}); corrupt or not a "
                             "raster") from None
    if ds is None:
        raise BadScene(path, "GDAL cannot open it; corrupt or not a raster")
    if ds.RasterCount == 0:
        raise BadScene(path, "the file holds no raster band")
    w, h = ds.RasterXSize, ds.RasterYSize
    if read_check:
        try:
            for i in range(1, ds.RasterCount + 1):
                ds.GetRasterBand(i).ReadRaster(w - 1, h - 1, 1, 1)
        except RuntimeError as exc:
            raise BadScene(path, f"cannot read its last block, the file is probably truncated "
                                 f"or corrupt ({_short(exc, path)})") from None
    gt = ds.GetGeoTransform(can_return_null=True)
    band1 = ds.GetRasterBand(1)
    info = RasterInfo(
        path=path, width=w, height=h, count=ds.RasterCount,
        dtype=gdal.GetDataTypeName(band1.DataType),
        geotransform=tuple(gt) if gt is not None else None,
        crs_wkt=ds.GetProjection() or "",
        descriptions=tuple(ds.GetRasterBand(i).GetDescription()
                           for i in range(1, ds.RasterCount + 1)),
        gcp_count=ds.GetGCPCount(),
    )
    return info


def _short(exc: BaseException, path: str) -> str:
    """First line of a GDAL error without the path (the message already starts with it)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for sep in (": ", ", ", ":"):
        msg = msg.replace(path + sep, "")
    msg = msg.replace(path, os.path.basename(path))
    return msg if len(msg) <= 200 else msg[:197] + "..."


@lru_cache(maxsize=256)
def same_crs(a_wkt: str, b_wkt: str) -> bool:
    """True when two WKT strings describe the same CRS (cached: scenes share a handful of CRSs)."""
    if a_wkt == b_wkt:
        return True
    if not a_wkt or not b_wkt:
        return False
    a, b = osr.SpatialReference(), osr.SpatialReference()
    a.ImportFromWkt(a_wkt)
    b.ImportFromWkt(b_wkt)
    return bool(a.IsSame(b))


@lru_cache(maxsize=256)
def crs_name(wkt: str) -> str:
    """Short CRS label for messages (e.g. 'EPSG:32633')."""
    if not wkt:
        return "no CRS"
    srs = osr.SpatialReference()
    srs.ImportFromWkt(wkt)
    srs.AutoIdentifyEPSG()
    code = srs.GetAuthorityCode(None)
    return f"EPSG:{code}" if code else (srs.GetName() or "unknown CRS")


def grid_factor(ref: RasterInfo, info: RasterInfo) -> int:
    """How many reference (10 m) pixels one pixel of `info` spans: 1, 2, 3, 6, ...

    Derived from the pixel sizes (sizes may be rounded: 1068 px at 10 m is 178 px at 60 m).
    """
    if ref.geotransform and info.geotransform:
        ratio = info.pixel_size / ref.pixel_size
    else:
        ratio = ref.width / max(info.width, 1)
    f = max(1, round(ratio))
    if abs(ratio - f) > 1e-3 * f:
        raise BadScene(info.path, f"pixel size {info.pixel_size:g} is not a whole multiple of "
                                  f"the reference pixel size {ref.pixel_size:g} ({ref.path})")
    return f


def check_same_grid(ref: RasterInfo, info: RasterInfo, factor: int) -> None:
    """`info` must cover `ref`'s extent in `ref`'s CRS with pixels `factor` times larger."""
    if not same_crs(ref.crs_wkt, info.crs_wkt):
        raise BadScene(info.path, f"CRS mismatch: {crs_name(info.crs_wkt)} but "
                                  f"{os.path.basename(ref.path)} has {crs_name(ref.crs_wkt)}")
    for size, ref_size, axis in ((info.width, ref.width, "width"),
                                 (info.height, ref.height, "height")):
        if abs(size * factor - ref_size) >= factor:
            raise BadScene(info.path, f"size mismatch: {axis} {size} px at {factor}x the "
                                      f"reference pixel, expected {ref_size / factor:g} px "
                                      f"(reference {os.path.basename(ref.path)}: "
                                      f"{ref.width}x{ref.height})")
    if ref.geotransform is None or info.geotransform is None:
        if (ref.geotransform is None) != (info.geotransform is None):
            raise BadScene(info.path, "georeferencing mismatch: one of the rasters has no "
                                      "geotransform")
        return
    g, r = info.geotransform, ref.geotransform
    px = ref.pixel_size
    tol = 1e-3 * px
    if abs(g[0] - r[0]) > tol or abs(g[3] - r[3]) > tol:
        raise BadScene(info.path, f"extent mismatch: origin ({g[0]:.3f}, {g[3]:.3f}) differs "
                                  f"from ({r[0]:.3f}, {r[3]:.3f}) of {os.path.basename(ref.path)}")
    for k in (1, 5):
        if abs(g[k] - r[k] * factor) > 1e-4 * abs(r[k] * factor):
            raise BadScene(info.path, f"pixel size {g[k]:g} does not match "
                                      f"{r[k] * factor:g} expected from the reference")
    if g[2] or g[4]:
        raise BadScene(info.path, "rotated geotransforms are not supported")


def s2_scene(name: str, band_files: dict[str, tuple[str, int]], required: Iterable[str],
             ref_band: str = "B02", s1_files: dict[str, str] | None = None,
             scl: str | None = None, label: str | None = None,
             offsets: dict[str, float] | None = None, scale: float = 1.0,
             scene_classes: tuple[int, ...] | None = None, folder: str = "") -> Scene:
    """A `Scene` from per-band files (path, band index), checking presence, grids and CRS.

    Resolutions come from the pixel sizes relative to the reference band, not from the band
    names, so data sets that resampled everything to 10 m are read correctly.
    """
    missing = [b for b in required if b not in band_files]
    if missing:
        raise BadScene(folder or name, f"missing band(s) {', '.join(missing)}")
    if ref_band not in band_files:
        ref_band = next(iter(band_files))
    infos: dict[str, RasterInfo] = {}

    def info_for(path: str) -> RasterInfo:
        if path not in infos:
            infos[path] = probe(path)
        return infos[path]

    ref = info_for(band_files[ref_band][0])
    if ref.geotransform is None:
        raise BadScene(ref.path, "no geotransform (not georeferenced)")
    offsets = offsets or {}
    s2: dict[str, BandSource] = {}
    order = {b: i for i, b in enumerate(B.S2_BANDS)}
    for band in sorted(band_files, key=lambda b: (order.get(b, len(order)), b)):
        path, idx = band_files[band]
        info = info_for(path)
        if idx > info.count:
            raise BadScene(path, f"band {band} expected as band {idx} but the file has "
                                 f"{info.count}")
        f = grid_factor(ref, info)
        check_same_grid(ref, info, f)
        s2[band] = BandSource(path, idx, 10 * f, offsets.get(band, 0.0), scale)
    s1: dict[str, BandSource] = {}
    for pol, path in sorted((s1_files or {}).items(), key=lambda kv: B.S1_BANDS.index(kv[0])):
        info = info_for(path)
        check_same_grid(ref, info, 1)
        s1[pol] = BandSource(path, 1, 10)
    scl_src = None
    if scl:
        info = info_for(scl)
        f = grid_factor(ref, info)
        check_same_grid(ref, info, f)
        scl_src = BandSource(scl, 1, 10 * f)
    label_src = None
    if label:
        info = info_for(label)
        check_same_grid(ref, info, 1)
        label_src = BandSource(label, 1, 10)
    return Scene(name=name, width=ref.width, height=ref.height, crs_wkt=ref.crs_wkt,
                 geotransform=ref.geotransform, s2=s2, s1=s1, label_raster=label_src,
                 scene_classes=scene_classes, scl=scl_src)


def collect(items: Iterable[T], build: Callable[[T], Scene | None], skip_bad: bool,
            progress: bool = False, desc: str = "scan"
            ) -> tuple[list[Scene], list[tuple[str, str]]]:
    """Build one scene per item; a `BadScene` stops with a `UserError` or, with skip_bad, is
    recorded as (path, reason). `build` may return None for an item that is deliberately left out.
    """
    from hpcsrl.progress import progress_bar

    scenes: list[Scene] = []
    skipped: list[tuple[str, str]] = []
    items = list(items)
    quiet = not progress or len(items) < 50
    for item in progress_bar(items, desc=desc, unit="scene", disable=quiet):
        try:
            scene = build(item)
        except BadScene as bad:
            if not skip_bad:
                raise UserError(f"{bad.path}: {bad.reason} (fix or remove it, or use --skip-bad "
                                f"to skip this scene)") from None
            skipped.append((bad.path, bad.reason))
            continue
        if scene is not None:
            scenes.append(scene)
    scenes.sort(key=lambda s: s.name)
    skipped.sort()
    return scenes, skipped


def require_scenes(scenes: list[Scene], skipped: list[tuple[str, str]], root: os.PathLike | str,
                   fmt: str, hint: str) -> None:
    """An empty result is always an error: say whether nothing was found or everything was bad."""
    if scenes:
        return
    if skipped:
        raise UserError(f"{root}: all {len(skipped)} {fmt} scene(s) are bad; first: "
                        f"{skipped[0][0]}: {skipped[0][1]}")
    raise UserError(f"{root}: no {fmt} scenes found ({hint})")
