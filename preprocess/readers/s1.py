"""Sentinel-1 GeoTIFFs (VV/VH pairs) and GRD `measurement/*.tiff` files, always served in dB.

Pairs are files whose names differ only in the polarisation token (`x_VV.tif` / `x_VH.tif`,
`VV.tif` / `VH.tif`, `s1a-iw-grd-vv-...tiff` / `...-vh-...`). Units are decided per file: a `db`
token in the name means dB, `lin`/`linear` means linear power; otherwise integer data are GRD
amplitude DNs, float data with any negative value are dB and non-negative float data linear power.

Nothing is written to disk: conversions and warps are GDAL VRT documents passed as the
`BandSource.path` string itself (GDAL opens a string starting with `<VRTDataset` as a VRT), so
every MPI rank on every node can open them without a shared scratch folder.
- linear power -> dB: a VRT derived band with the `dB` pixel function, 10 * log10(x);
  amplitude DN -> dB: 20 * log10(DN), minus 20 * log10(A) where A is the median sigma-nought
  calibration constant of `annotation/calibration/calibration-*-<pol>-*.xml` when the GRD product
  has one (otherwise values are uncalibrated dB of the DN); zeros (no data) become -inf.
- GRD measurements carry ground control points, not a geotransform: `gdal.Warp(format="VRT")`
  resamples them bilinearly onto a 10 m grid in the UTM zone of the GCPs' centre (polynomial GCP
  transform); VH is warped onto exactly the VV grid. The dB VRT then wraps the warped VRT.
"""

from __future__ import annotations

import math
import re
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from osgeo import gdal

from hpcsrl.data import bands as B
from preprocess.readers.raster import (
    BadScene,
    RasterInfo,
    check_same_grid,
    collect,
    probe,
    require_scenes,
    walk,
)
from preprocess.scene import BandSource, Scene, SceneSet

FMT = "s1"
POL = re.compile(r"(?<![A-Za-z0-9])(vv|vh)(?![A-Za-z0-9])", re.IGNORECASE)
TIFF = (".tif", ".tiff")
GRD_RES_M = 10.0


@dataclass
class PolGroup:
    folder: Path
    name: str
    files: dict[str, str] = field(default_factory=dict)  # VV/VH -> path


def find_pairs(root: Path) -> list[PolGroup]:
    """Files with a VV/VH token, grouped by (folder, name with the token masked)."""
    groups: dict[tuple[str, str], PolGroup] = {}
    for folder, _, filenames in walk(root):
        for fn in filenames:
            if not fn.lower().endswith(TIFF):
                continue
            matches = list(POL.finditer(fn))
            if not matches:
                continue
            m = matches[-1]
            key = fn[: m.start()] + "{}" + fn[m.end():]
            stem = re.sub(r"[_\-.]{2,}", "_", key.rsplit(".", 1)[0].replace("{}", "")).strip("_-.")
            if not stem:
                rel = folder.relative_to(root).as_posix()
                stem = folder.name if rel == "." else rel
            g = groups.setdefault((str(folder), key), PolGroup(folder, stem))
            g.files[m.group(1).upper()] = str(folder / fn)
    return [g for _, g in sorted(groups.items())]


def units(path: str, info: RasterInfo) -> str:
    """'db', 'linear' (power) or 'amplitude' (GRD DN), from the name, the type, then the data."""
    tokens = set(re.split(r"[_\-.]+", Path(path).name.lower()))
    if "db" in tokens:
        return "db"
    if tokens & {"lin", "linear"}:
        return "linear"
    if not info.dtype.startswith(("Float", "CFloat")):
        return "amplitude"
    ds = gdal.Open(path)
    band = ds.GetRasterBand(1)
    sample = band.ReadAsArray(buf_xsize=min(info.width, 64), buf_ysize=min(info.height, 64))
    nodata = band.GetNoDataValue()
    sample = sample[np.isfinite(sample)]
    if nodata is not None:
        sample = sample[sample != nodata]
    return "db" if (sample < 0).any() else "linear"


def calibration_constant(measurement: str, pol: str) -> float | None:
    """Median sigma-nought calibration value of the GRD product holding `measurement`, if any."""
    cal_dir = Path(measurement).parent.parent / "annotation" / "calibration"
    for xml in sorted(cal_dir.glob(f"calibration-*-{pol.lower()}-*.xml")):
        try:
            values = [float(v) for el in ET.parse(xml).iter()
                      if el.tag.rsplit("}", 1)[-1] == "sigmaNought" and el.text
                      for v in el.text.split()]
        except (OSError, ET.ParseError, ValueError) as exc:
            raise BadScene(xml, f"cannot parse the calibration annotation ({exc})") from None
        if values:
            return statistics.median(values)
    return None


def utm_epsg(lon: float, lat: float) -> int:
    zone = min(60, max(1, int(math.floor((lon + 180.0) / 6.0)) + 1))
    return (32600 if lat >= 0 else 32700) + zone


def warp_to_grid(path: str, bounds: tuple[float, float, float, float] | None = None,
                 dst_srs: str | None = None) -> gdal.Dataset:
    """A warped VRT of a GCP-referenced raster on a 10 m UTM grid (or on given bounds/CRS)."""
    src = gdal.Open(path)
    if dst_srs is None:
        gcps = src.GetGCPs()
        lon = sum(g.GCPX for g in gcps) / len(gcps)
        lat = sum(g.GCPY for g in gcps) / len(gcps)
        dst_srs = f"EPSG:{utm_epsg(lon, lat)}"
    kwargs = dict(format="VRT", dstSRS=dst_srs, xRes=GRD_RES_M, yRes=GRD_RES_M,
                  resampleAlg="bilinear", outputType=gdal.GDT_Float32, srcNodata=0, dstNodata=0)
    if bounds is None:
        kwargs["targetAlignedPixels"] = True
    else:
        kwargs["outputBounds"] = bounds
    try:
        return gdal.Warp("", src, **kwargs)
    except RuntimeError as exc:
        raise BadScene(path, f"cannot warp its ground control points to a grid ({exc})") from None


def vrt_xml(ds: gdal.Dataset) -> str:
    """The VRT document of an in-memory VRT dataset (usable as a GDAL path)."""
    return ds.GetMetadata("xml:VRT")[0]


def db_vrt(source: str, width: int, height: int, gt: tuple[float, ...], wkt: str,
           factor: float) -> str:
    """A VRT document converting band 1 of `source` to dB: factor * log10(|x|)."""
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = wkt
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in gt)
    band = ET.SubElement(root, "VRTRasterBand", dataType="Float32", band="1",
                         subClass="VRTDerivedRasterBand")
    ET.SubElement(band, "PixelFunctionType").text = "dB"
    ET.SubElement(band, "PixelFunctionArguments", fact=f"{factor:g}")
    src = ET.SubElement(band, "SimpleSource")
    ET.SubElement(src, "SourceFilename", relativeToVRT="0").text = source
    ET.SubElement(src, "SourceBand").text = "1"
    return ET.tostring(root, encoding="unicode")


def s1_scene(g: PolGroup, pols: tuple[str, ...]) -> Scene:
    """Scene of one VV(/VH) group on the VV grid, every band served in dB."""
    missing = [p for p in pols if p not in g.files]
    if missing:
        raise BadScene(g.files.get("VV", g.folder), f"missing polarisation(s) {', '.join(missing)}")
    infos = {p: probe(g.files[p]) for p in pols}
    ref_pol = pols[0]
    grid: tuple[int, int, tuple[float, ...], str] | None = None
    bounds = srs = None
    sources: dict[str, BandSource] = {}
    for pol in pols:
        path, info = g.files[pol], infos[pol]
        kind = units(path, info)
        src_path = path
        if info.geotransform is None:
            if info.gcp_count < 3:
                raise BadScene(path, "neither a geotransform nor ground control points")
            warped = warp_to_grid(path, bounds, srs)
            if bounds is None:
                gt = warped.GetGeoTransform()
                bounds = (gt[0], gt[3] + gt[5] * warped.RasterYSize,
                          gt[0] + gt[1] * warped.RasterXSize, gt[3])
                srs = warped.GetProjection()
            src_path = vrt_xml(warped)
            w, h, gt, wkt = (warped.RasterXSize, warped.RasterYSize, warped.GetGeoTransform(),
                             warped.GetProjection())
        else:
            if pol != ref_pol:
                check_same_grid(infos[ref_pol], info, 1)
            w, h, gt, wkt = info.width, info.height, info.geotransform, info.crs_wkt
        offset = 0.0
        if kind != "db":
            factor = 10.0 if kind == "linear" else 20.0
            if kind == "amplitude":
                cal = calibration_constant(path, pol)
                offset = -20.0 * math.log10(cal) if cal else 0.0
            src_path = db_vrt(src_path, w, h, gt, wkt, factor)
        if grid is None:
            grid = (w, h, tuple(gt), wkt)
        elif (w, h) != grid[:2]:
            raise BadScene(path, f"size mismatch: {w}x{h} but {ref_pol} is {grid[0]}x{grid[1]}")
        sources[pol] = BandSource(src_path, 1, B.S1_RESOLUTION_M, offset, 1.0)
    w, h, gt, wkt = grid
    return Scene(name=g.name, width=w, height=h, crs_wkt=wkt, geotransform=gt, s1=sources,
                 nodata=None)


def read(root: Path, *, skip_bad: bool = False, exclude: frozenset[str] = frozenset(),
         progress: bool = False) -> SceneSet:
    """Every VV(/VH) group under `root`; VH is required as soon as one group has it."""
    groups = [g for g in find_pairs(root) if g.name not in exclude]
    pols = B.S1_BANDS if any("VH" in g.files for g in groups) else ("VV",)
    scenes, skipped = collect(groups, lambda g: s1_scene(g, pols), skip_bad, progress, desc="s1")
    require_scenes(scenes, skipped, root, FMT, "expected GeoTIFFs named *_VV.tif / *_VH.tif")
    return SceneSet(scenes=scenes, class_names=(), fmt=FMT, s2_bands=(), s1_bands=pols,
                    skipped=skipped)
