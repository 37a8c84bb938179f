"""Sentinel-2 L2A SAFE products: per-band JPEG2000 files plus the radiometric offset from the MTD.

Layout: `<product>.SAFE/MTD_MSIL2A.xml` and
`GRANULE/<granule>/IMG_DATA/R{10,20,60}m/<tile>_<date>_<band>_<res>.jp2`; the R20m and R60m
folders also hold down-sampled copies of finer bands, so every band is taken from the folder of
its native resolution. The SCL raster is `R20m/*_SCL_20m.jp2`.

The band files are read directly (GDAL's JP2OpenJPEG driver) rather than through the SENTINEL2
driver's per-resolution subdatasets: the tiler then reads each band at its native grid exactly as
for the other formats. Since processing baseline 04.00, DN = (reflectance * 10000) - offset with
`BOA_ADD_OFFSET` = -1000 per band in the MTD; it goes into `BandSource.offset`, and
`BandSource.scale` = 10000 / `BOA_QUANTIFICATION_VALUE` keeps physical values in reflectance x 10000
as for every other reader.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from hpcsrl.data import bands as B
from preprocess.readers.raster import BadScene, collect, require_scenes, s2_scene
from preprocess.scene import SceneSet

FMT = "safe"
MTD = "MTD_MSIL2A.xml"
# band_id attribute of BOA_ADD_OFFSET / Spectral_Information in the MTD (B10 included).
MTD_BAND_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
                  "B11", "B12")
JP2 = re.compile(r"_(?P<band>B\d{2}|B8A|SCL)_(?P<res>10|20|60)m\.jp2$", re.IGNORECASE)


def find_products(root: Path) -> list[Path]:
    """`root` itself if it is a .SAFE folder, else the .SAFE folders up to two levels below it."""
    if root.suffix.upper() == ".SAFE":
        return [root]
    found = sorted(p for p in root.glob("*.SAFE") if p.is_dir())
    found += sorted(p for p in root.glob("*/*.SAFE") if p.is_dir())
    return found


def radiometry(mtd: Path) -> tuple[dict[str, float], float]:
    """Per-band BOA_ADD_OFFSET (0 before baseline 04.00) and BOA_QUANTIFICATION_VALUE."""
    try:
        tree = ET.parse(mtd)
    except FileNotFoundError:
        raise BadScene(mtd, "product metadata is missing (is this an L2A product?)") from None
    except (OSError, ET.ParseError) as exc:
        raise BadScene(mtd, f"cannot parse the product metadata ({exc})") from None
    offsets: dict[str, float] = {}
    quantification = 10000.0
    for el in tree.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        try:
            if tag == "BOA_ADD_OFFSET":
                offsets[MTD_BAND_ORDER[int(el.get("band_id", ""))]] = float(el.text or "")
            elif tag == "BOA_QUANTIFICATION_VALUE":
                quantification = float(el.text or "")
        except (ValueError, IndexError):
            raise BadScene(mtd, f"malformed {tag} element: {ET.tostring(el, 'unicode')[:120]}"
                           ) from None
    if quantification <= 0:
        raise BadScene(mtd, f"BOA_QUANTIFICATION_VALUE {quantification} must be positive")
    return offsets, quantification


def granule_files(product: Path) -> list[tuple[str, dict[str, str], str | None]]:
    """Per granule: (granule name, band -> jp2 at native resolution, SCL jp2 or None)."""
    out = []
    for granule in sorted((product / "GRANULE").glob("*")):
        img = granule / "IMG_DATA"
        if not img.is_dir():
            continue
        bands: dict[str, str] = {}
        scl = None
        for f in sorted(img.glob("R*m/*.jp2")):
            m = JP2.search(f.name)
            if not m:
                continue
            band, res = m.group("band").upper(), int(m.group("res"))
            if band == "SCL":
                if res == B.SCL_RESOLUTION_M:
                    scl = str(f)
            elif band in B.S2_RESOLUTION_M and B.S2_RESOLUTION_M[band] == res:
                bands[band] = str(f)
        out.append((granule.name, bands, scl))
    return out


def read(root: Path, *, skip_bad: bool = False, exclude: frozenset[str] = frozenset(),
         progress: bool = False) -> SceneSet:
    """One scene per granule of every L2A product under `root`."""
    products = [p for p in find_products(root) if p.stem not in exclude]

    def build(product: Path):
        offsets, q = radiometry(product / MTD)
        granules = granule_files(product)
        if not granules:
            raise BadScene(product, "no GRANULE/*/IMG_DATA folder")
        if len(granules) > 1:
            raise BadScene(product, "several granules in one product are not supported; "
                                    "split the product")
        _, bands, scl = granules[0]
        return s2_scene(product.stem, {b: (p, 1) for b, p in bands.items()}, B.S2_BANDS,
                        scl=scl, offsets=offsets, scale=B.S2_QUANTIFICATION / q,
                        folder=str(product))

    scenes, skipped = collect(products, build, skip_bad, progress, desc="safe")
    require_scenes(scenes, skipped, root, FMT, "expected *.SAFE folders with MTD_MSIL2A.xml")
    return SceneSet(scenes=scenes, class_names=(), fmt=FMT, s2_bands=B.S2_BANDS, skipped=skipped)
