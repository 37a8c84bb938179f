"""Small Sentinel-2-like scenes written with GDAL for the tiling / writer / pipeline tests.

One GeoTIFF per band at its native resolution on aligned grids (10/20/60 m), optional SCL (20 m),
label raster (10 m) and S1 VV/VH, named `<scene>_<band>.tif` (the synthetic reader's layout), and
the matching `Scene` built directly so tests need not depend on the readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from osgeo import gdal, osr

from hpcsrl.data.bands import S2_BANDS, S2_RESOLUTION_M
from preprocess.scene import BandSource, Scene, SceneSet

gdal.UseExceptions()
CLASSES = ("forest", "water", "crops")


def _smooth(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> np.ndarray:
    """A smooth random field (bilinear up-sampling then matters) plus fine noise."""
    coarse = rng.random((h // 6 + 2, w // 6 + 2))
    yy = np.linspace(0, coarse.shape[0] - 1.001, h)
    xx = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    c = coarse
    f = (c[y0][:, x0] * (1 - fy) * (1 - fx) + c[y0 + 1][:, x0] * fy * (1 - fx)
         + c[y0][:, x0 + 1] * (1 - fy) * fx + c[y0 + 1][:, x0 + 1] * fy * fx)
    f = f + 0.05 * rng.random((h, w))
    return lo + (hi - lo) * f / f.max()


def write_tif(path: Path, array: np.ndarray, res: int, origin=(600000.0, 5000000.0),
              dtype=gdal.GDT_UInt16) -> None:
    h, w = array.shape
    ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, 1, dtype)
    ds.SetGeoTransform((origin[0], res, 0.0, origin[1], 0.0, -res))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    ds.SetProjection(srs.ExportToWkt())
    ds.GetRasterBand(1).WriteArray(array)
    ds.FlushCache()
    ds = None


def write_scene(folder: Path, name: str, width: int, height: int, seed: int = 0, *,
                scl: np.ndarray | None = None, labels: np.ndarray | None = None,
                s1: bool = False, nodata_box: tuple[int, int, int, int] | None = None) -> Scene:
    """Write one scene; `scl` is at 20 m, `labels` at 10 m; `nodata_box` (x0, y0, x1, y1) at
    10 m sets every band to 0 there. Returns the Scene pointing at the files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    s2 = {}
    for b in S2_BANDS:
        res = S2_RESOLUTION_M[b]
        f = res // 10
        a = _smooth(rng, height // f, width // f, 200, 9000).astype(np.uint16)
        if nodata_box is not None:
            x0, y0, x1, y1 = nodata_box
            a[y0 // f:y1 // f, x0 // f:x1 // f] = 0
        path = folder / f"{name}_{b}.tif"
        write_tif(path, a, res)
        s2[b] = BandSource(str(path), 1, res)
    s1_sources = {}
    if s1:
        for b, lo in (("VV", -18.0), ("VH", -25.0)):
            path = folder / f"{name}_{b}.tif"
            write_tif(path, _smooth(rng, height, width, lo, lo + 10).astype(np.float32), 10,
                      dtype=gdal.GDT_Float32)
            s1_sources[b] = BandSource(str(path), 1, 10)
    scl_src = lab_src = None
    if scl is not None:
        path = folder / f"{name}_SCL.tif"
        write_tif(path, scl.astype(np.uint8), 20, dtype=gdal.GDT_Byte)
        scl_src = BandSource(str(path), 1, 20)
    if labels is not None:
        path = folder / f"{name}_label.tif"
        write_tif(path, labels.astype(np.uint8), 10, dtype=gdal.GDT_Byte)
        lab_src = BandSource(str(path), 1, 10)
        (folder / "classes.json").write_text(json.dumps(list(CLASSES)))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    return Scene(name=name, width=width, height=height, crs_wkt=srs.ExportToWkt(),
                 geotransform=(600000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0), s2=s2, s1=s1_sources,
                 label_raster=lab_src, scl=scl_src, nodata=0.0)


def scene_set(scenes: list[Scene], s1: bool = False) -> SceneSet:
    return SceneSet(scenes=scenes, class_names=CLASSES, fmt="test", s2_bands=S2_BANDS,
                    s1_bands=("VV", "VH") if s1 else ())


def default_labels(width: int, height: int) -> np.ndarray:
    """Three class stripes and an unlabelled (255) corner."""
    lab = np.zeros((height, width), np.uint8)
    lab[:, width // 3:] = 1
    lab[:, 2 * width // 3:] = 2
    lab[: height // 8, : width // 8] = 255
    return lab
