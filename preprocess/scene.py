"""What a reader hands the tiler: one scene as GDAL band sources on a common 10 m grid.

Every input format (synthetic layout, BigEarthNet v1 folders, Sentinel-2 L2A SAFE, Sentinel-1
GeoTIFFs, labelled chip folders) is turned into `Scene` objects by `preprocess.readers`; the tiler
and writer never look at file layouts. All pixel coordinates are on the scene's 10 m grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BandSource:
    """One raster band: a GDAL-openable path (file or subdataset string) and its 1-based band index.

    `resolution_m` is the native ground sampling (10, 20 or 60 for Sentinel-2, 10 for S1 and chips).
    Physical value = (DN + offset) * scale (e.g. L2A baseline >= 04.00: offset -1000).
    """

    path: str
    band_index: int = 1
    resolution_m: int = 10
    offset: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Scene:
    """A scene (or a single chip / BigEarthNet patch) ready to be tiled.

    width/height are in 10 m pixels. `s2` maps Sentinel-2 band names (B01..B12, B8A; or R,G,B for
    RGB chips) to sources; `s1` maps VV/VH. `label_raster` holds a class index per 10 m pixel
    (255 = unlabelled); chips and BigEarthNet patches instead carry `scene_classes` (indices into
    the data set's class list). `scl` is a Sentinel-2 scene-classification raster used for the
    cloud / no-data filter (0 no data, 3 cloud shadow, 8-10 cloud and cirrus).
    """

    name: str
    width: int
    height: int
    crs_wkt: str = ""
    geotransform: tuple[float, ...] = (0.0, 10.0, 0.0, 0.0, 0.0, -10.0)
    s2: dict[str, BandSource] = field(default_factory=dict)
    s1: dict[str, BandSource] = field(default_factory=dict)
    label_raster: BandSource | None = None
    scene_classes: tuple[int, ...] | None = None
    scl: BandSource | None = None
    nodata: float | None = 0.0

    def n_patches(self, patch_size: int) -> int:
        """Patches of `patch_size` that fit on the 10 m grid (row-major, no overlap)."""
        return (self.height // patch_size) * (self.width // patch_size)


@dataclass(frozen=True)
class SceneSet:
    """Everything a reader found: the scenes in a deterministic order and the data set's classes."""

    scenes: list[Scene]
    class_names: tuple[str, ...]
    fmt: str
    s2_bands: tuple[str, ...]
    s1_bands: tuple[str, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) with --skip-bad
