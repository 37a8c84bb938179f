"""Cut one scene into patches: windowed GDAL reads, seamless bilinear up-sampling, filter, labels.

Reads go one piece of a patch row at a time: a strip P pixels high over a run of at most
`STRIP_PATCHES` patch columns. Every window is aligned to the patch grid, so a patch gets
bit-identical values whichever rank reads it and however its row is cut (determinism for any rank
count), and a rank whose range starts or ends mid-row reads only its own columns. Patch origins are
multiples of P, and P a multiple of 6, so 20 m and 60 m windows start on whole source pixels. Those
bands are up-sampled to 10 m by `bilinear_upsample` on a native window read with one source pixel
of margin, which reproduces `gdalwarp -r bilinear` (Float32 output) of the whole band exactly,
no-data rules included, so there are no seams between patches; `data_super` stores it rounded half
up to uint16 DN (gdalwarp's UInt16 output but for some exact .5 ties of the 60 m bands, which
GDAL rounds down). (GDAL's own resampled RasterIO
would round to the source integer type: up to 1 DN off.) The cloud / no-data filter runs first, on
the few rasters it needs; the other bands are read only for runs that keep a patch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from osgeo import gdal

from hpcsrl.data.bands import (
    RGB_BANDS,
    S1_BANDS,
    S2_10M,
    S2_20M,
    S2_60M,
    S2_BANDS,
    SCL_CIRRUS,
    SCL_CLOUD_HIGH,
    SCL_CLOUD_MEDIUM,
    SCL_CLOUD_SHADOW,
    SCL_NO_DATA,
)
from hpcsrl.errors import UserError
from preprocess.scene import BandSource, Scene, SceneSet

gdal.UseExceptions()


@contextlib.contextmanager
def _quiet_gdal() -> Iterator[None]:
    """GDAL warnings (e.g. about a damaged TIFF) would print beside our one-line error; the
    exception raised on a real failure carries the message anyway."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        yield
    finally:
        gdal.PopErrorHandler()

# Columns read at once: wide enough that per-read overheads stay small, narrow enough that a strip
# of every band stays in cache (two ranks on two cores otherwise contend for memory bandwidth).
STRIP_PATCHES = 16
CLOUD_CLASSES = (SCL_CLOUD_SHADOW, SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)
UNLABELLED = 255
SUPER_DTYPE = np.dtype(np.uint16)  # data_super: rounded DN, as the native bands (SCHEMA.md)


@dataclass(frozen=True)
class Layout:
    """Which datasets the output has, derived once from the SceneSet (the same for every scene)."""

    optical: str | None  # "l2a" (the 12 bands), "rgb" (R, G, B chips) or None
    s1_bands: tuple[str, ...]
    patch_size: int
    n_classes: int

    def image_datasets(self) -> dict[str, tuple[tuple[str, ...], int, np.dtype]]:
        """Image dataset name -> (band names, native resolution in m, stored dtype)."""
        out: dict[str, tuple[tuple[str, ...], int, np.dtype]] = {}
        if self.optical == "l2a":
            out["data_10m"] = (S2_10M, 10, np.dtype(np.uint16))
            out["data_20m"] = (S2_20M, 20, np.dtype(np.uint16))
            out["data_60m"] = (S2_60M, 60, np.dtype(np.uint16))
            out["data_super"] = (S2_BANDS, 10, SUPER_DTYPE)
        elif self.optical == "rgb":
            out["rgb"] = (RGB_BANDS, 10, np.dtype(np.uint8))
        if self.s1_bands:
            out["s1"] = (self.s1_bands, 10, np.dtype(np.float32))
        return out

    def datasets(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every output dataset: name -> (shape of one row, dtype), in SCHEMA.md terms."""
        p = self.patch_size
        out = {name: ((len(bands), p * 10 // res, p * 10 // res), dtype)
               for name, (bands, res, dtype) in self.image_datasets().items()}
        out["classes"] = ((self.n_classes,), np.dtype(np.uint8))
        out["label"] = ((), np.dtype(np.int16))
        for name in ("scene", "row", "col"):
            out[name] = ((), np.dtype(np.int32))
        return out


def layout_for(sceneset: SceneSet, patch_size: int) -> Layout:
    """The output layout of a scene set, or a UserError saying why it cannot be tiled."""
    s2 = set(sceneset.s2_bands)
    if set(S2_BANDS) <= s2:
        optical: str | None = "l2a"
    elif set(RGB_BANDS) <= s2:
        optical = "rgb"
    elif not s2:
        optical = None
    else:
        missing = sorted(set(S2_BANDS) - s2)
        raise UserError(f"input has Sentinel-2 bands {', '.join(sceneset.s2_bands)}: missing "
                        f"{', '.join(missing)} (need the 12 L2A bands or R, G, B)")
    s1 = tuple(b for b in S1_BANDS if b in sceneset.s1_bands)
    if optical is None and not s1:
        raise UserError("input has neither Sentinel-2 nor Sentinel-1 bands")
    if patch_size <= 0:
        raise UserError(f"--patch-size {patch_size}: must be positive")
    if optical == "l2a" and patch_size % 6:
        raise UserError(f"--patch-size {patch_size}: must be a multiple of 6 so that 20 m and "
                        "60 m windows align (e.g. 120)")
    return Layout(optical, s1, patch_size, len(sceneset.class_names))


def scene_problem(scene: Scene, layout: Layout) -> str | None:
    """Why `scene` lacks a band the layout needs (None when complete)."""
    need = [(b, scene.s2) for bands, _, _ in _optical(layout) for b in bands]
    need += [(b, scene.s1) for b in layout.s1_bands]
    missing = [b for b, table in need if b not in table]
    if missing:
        return f"scene {scene.name}: missing band(s) {', '.join(missing)}"
    return None


def _optical(layout: Layout) -> list[tuple[tuple[str, ...], int, np.dtype]]:
    return [v for k, v in layout.image_datasets().items() if k != "s1"]


# --- pure per-patch functions ----------------------------------------------------------------

def cut_patches(strip: np.ndarray, first_col: int, stop_col: int, size: int) -> np.ndarray:
    """(C, size, W) strip -> (k, C, size, size) contiguous patches of columns [first, stop)."""
    c = strip.shape[0]
    part = strip[:, :, first_col * size:stop_col * size]
    k = stop_col - first_col
    return np.ascontiguousarray(part.reshape(c, size, k, size).transpose(2, 0, 1, 3))


def cloud_fraction(scl: np.ndarray) -> np.ndarray:
    """(k, P, P) scene classification -> fraction of cloud / shadow / cirrus pixels per patch."""
    return np.isin(scl, CLOUD_CLASSES).reshape(len(scl), -1).mean(axis=1)


def nodata_fraction(bands: np.ndarray, nodata: float | None,
                    scl: np.ndarray | None = None) -> np.ndarray:
    """Fraction of no-data pixels per patch: SCL == 0, or every band == nodata at the pixel.

    `bands` is (k, C, P, P) raw values at 10 m; NaN `nodata` matches NaN pixels.
    """
    k = len(bands)
    mask = np.zeros((k,) + bands.shape[2:], dtype=bool)
    if nodata is not None and bands.shape[1] > 0:
        hit = np.isnan(bands) if math.isnan(nodata) else bands == nodata
        mask |= hit.all(axis=1)
    if scl is not None:
        mask |= scl == SCL_NO_DATA
    return mask.reshape(k, -1).mean(axis=1)


def raster_labels(labels: np.ndarray, n_classes: int,
                  min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, P, P) class indices -> (majority label (k,) int16, multi-hot (k, K) uint8).

    Values >= n_classes (255) are unlabelled. Majority ties go to the lower class index; a patch
    with no labelled pixel gets -1. Multi-hot marks classes covering >= min_fraction of the
    labelled pixels.
    """
    k = len(labels)
    flat = labels.reshape(k, -1).astype(np.int64)
    valid = (flat >= 0) & (flat < n_classes)
    owner = np.broadcast_to(np.arange(k)[:, None], flat.shape)
    counts = np.bincount((owner * n_classes + flat)[valid],
                         minlength=k * n_classes).reshape(k, n_classes)
    total = counts.sum(axis=1)
    label = np.where(total > 0, counts.argmax(axis=1), -1).astype(np.int16)
    frac = counts / np.maximum(total, 1)[:, None]
    multi = ((counts > 0) & (frac >= min_fraction)).astype(np.uint8)
    return label, multi


def scene_labels(classes: tuple[int, ...], n_classes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of a chip / BigEarthNet patch: the multi-hot of its classes; single label only
    when it has exactly one class (-1 otherwise)."""
    multi = np.zeros((k, n_classes), dtype=np.uint8)
    multi[:, list(classes)] = 1
    single = classes[0] if len(classes) == 1 else -1
    return np.full(k, single, dtype=np.int16), multi


def to_stored(raw: np.ndarray, src: BandSource, dtype: np.dtype) -> np.ndarray:
    """Raw DNs -> stored values: (DN + offset) * scale, rounded half up (as GDAL rounds) and
    clipped for integer dtypes."""
    if src.offset == 0 and src.scale == 1 and raw.dtype == dtype:
        return raw
    value = (raw.astype(np.float64) + src.offset) * src.scale
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        value = np.clip(np.floor(value + 0.5), info.min, info.max)
    return value.astype(dtype)


def _axis_taps(start: int, n_out: int, factor: int, n_src: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps on one axis for output pixels [start, start+n_out) of a `factor`x finer grid.

    Pixel-centre convention (as GDAL): output i samples source coordinate (i + 0.5)/factor - 0.5.
    Returns the lower/upper source index (clamped at the edges, which equals GDAL dropping the
    outside tap and renormalising), the upper tap's weight, and the source pixel under the centre.
    """
    i = np.arange(start, start + n_out)
    u = (i + 0.5) / factor - 0.5
    i0 = np.floor(u).astype(np.int64)
    centre = np.clip(((i + 0.5) // factor).astype(np.int64), 0, n_src - 1)
    return np.clip(i0, 0, n_src - 1), np.clip(i0 + 1, 0, n_src - 1), u - i0, centre


def bilinear_upsample(native: np.ndarray, src_row0: int, n_src_rows: int, factor: int,
                      row0: int, n_rows: int, n_cols: int, nodata: float | None,
                      src_col0: int = 0, n_src_cols: int | None = None,
                      col0: int = 0) -> np.ndarray:
    """Up-sample a native window to the 10 m grid exactly as `gdalwarp -r bilinear` does.

    `native` holds source rows [src_row0, src_row0 + len) and columns [src_col0, src_col0 + width)
    of a band of `n_src_rows` x `n_src_cols` pixels (default: the window ends at the band's right
    edge); it must include the pixels that output rows [row0, row0 + n_rows) and columns
    [col0, col0 + n_cols) tap, i.e. one source pixel of margin. No-data sources get zero weight and
    the rest are renormalised; an output pixel whose centre source pixel is no-data, or with no
    valid tap, is `nodata` (GDAL's rules). Computed in float64 (rows, then columns) and returned
    as float32, bit-equal to gdalwarp's Float32 output whatever the window.
    """
    if n_src_cols is None:
        n_src_cols = src_col0 + native.shape[1]
    lo_r, hi_r, wr, cr = _axis_taps(row0, n_rows, factor, n_src_rows)
    lo_c, hi_c, wc, cc = _axis_taps(col0, n_cols, factor, n_src_cols)
    lo_r, hi_r, cr = lo_r - src_row0, hi_r - src_row0, cr - src_row0
    lo_c, hi_c, cc = lo_c - src_col0, hi_c - src_col0, cc - src_col0

    def interp(x: np.ndarray) -> np.ndarray:
        # in place, and np.take for the column taps: far fewer passes over memory than
        # `x[:, lo] * (1 - w) + x[:, hi] * w`, with the very same operations per pixel
        top = x[lo_r].astype(np.float64, copy=False)
        top *= (1 - wr)[:, None]
        bottom = x[hi_r].astype(np.float64, copy=False)
        bottom *= wr[:, None]
        top += bottom
        left = np.take(top, lo_c, axis=1)
        left *= 1 - wc
        right = np.take(top, hi_c, axis=1)
        right *= wc
        left += right
        return left

    valid = None if nodata is None else native != nodata
    if valid is None or valid.all():  # the common case: one interpolation, no renormalising
        return interp(native).astype(np.float32)
    num, den = interp(np.where(valid, native, 0.0)), interp(valid.astype(np.float64))
    ok = (den > 0) & valid[cr][:, cc]
    out = np.full((n_rows, n_cols), nodata, np.float64)
    out[ok] = num[ok] / den[ok]
    return out.astype(np.float32)


# --- reading a scene -------------------------------------------------------------------------

@dataclass(frozen=True)
class FilterOptions:
    """Patch filter and label thresholds (fractions in [0, 1])."""

    max_cloud: float = 0.1
    max_nodata: float = 0.0
    min_class_fraction: float = 0.05


@dataclass
class Batch:
    """The kept patches of one strip (arrays keyed by output dataset name) and what was dropped."""

    arrays: dict[str, np.ndarray]
    n_seen: int
    dropped_cloud: int = 0
    dropped_nodata: int = 0
    n_kept: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_kept = len(self.arrays["label"])


class SceneTiler:
    """Open the GDAL sources of one scene once and read patch rows from them."""

    def __init__(self, scene: Scene, scene_index: int, layout: Layout, filt: FilterOptions):
        self.scene, self.index, self.layout, self.filt = scene, scene_index, layout, filt
        p = layout.patch_size
        self.n_cols = scene.width // p
        self._open: dict[str, gdal.Dataset] = {}
        problem = scene_problem(scene, layout)
        if problem:
            raise UserError(problem)
        for name, src in self._sources():
            self._band(name, src)  # open and check sizes up front: errors name the file early

    def _sources(self) -> list[tuple[str, BandSource]]:
        out = [(b, self.scene.s2[b]) for bands, _, _ in _optical(self.layout) for b in bands]
        out += [(b, self.scene.s1[b]) for b in self.layout.s1_bands]
        if self.scene.scl is not None:
            out.append(("SCL", self.scene.scl))
        if self.scene.label_raster is not None:
            out.append(("labels", self.scene.label_raster))
        return out

    def _band(self, name: str, src: BandSource) -> gdal.Band:
        """The GDAL band of a source, opened once, with its size checked against the scene."""
        try:
            ds = self._open.get(src.path)
            if ds is None:
                with _quiet_gdal():
                    ds = self._open[src.path] = gdal.Open(src.path)
            band = ds.GetRasterBand(src.band_index)
        except RuntimeError as exc:
            raise UserError(f"{src.path}: cannot open band {name} of scene {self.scene.name}: "
                            f"{str(exc).strip()}") from None
        if band is None:
            raise UserError(f"{src.path}: has no band {src.band_index} ({name}, scene "
                            f"{self.scene.name})")
        res = src.resolution_m
        ok = all(abs(n * res - m * 10) < res for n, m in ((band.XSize, self.scene.width),
                                                           (band.YSize, self.scene.height)))
        if not ok:
            raise UserError(
                f"{src.path}: band {name} is {band.XSize}x{band.YSize} pixels at {res} m, "
                f"expected {self.scene.width * 10 // res}x{self.scene.height * 10 // res} for "
                f"scene {self.scene.name} ({self.scene.width}x{self.scene.height} at 10 m)")
        return band

    def _read_array(self, name: str, src: BandSource, xoff: int, yoff: int, xs: int, ys: int,
                    **kwargs) -> np.ndarray:
        """One GDAL window read; any failure becomes a UserError naming the file and rows."""
        band = self._band(name, src)
        try:
            with _quiet_gdal():
                arr = band.ReadAsArray(xoff, yoff, xs, ys, **kwargs)
        except RuntimeError as exc:
            raise UserError(f"{src.path}: read failed for band {name} of scene {self.scene.name}"
                            f" (rows {yoff}-{yoff + ys}): {str(exc).strip()}") from None
        if arr is None:
            raise UserError(f"{src.path}: read failed for band {name} of scene {self.scene.name}")
        return arr

    def _read(self, name: str, src: BandSource, y0: int, x0: int, width: int,
              out_res: int = 10, alg: int = gdal.GRIORA_NearestNeighbour) -> np.ndarray:
        """A window [x0, x0+width) x [y0, y0+P) of the 10 m grid, delivered at `out_res` metres."""
        p = self.layout.patch_size
        f_src, f_out = src.resolution_m / 10, out_res / 10
        xoff, yoff = int(round(x0 / f_src)), int(round(y0 / f_src))
        xs, ys = int(round(width / f_src)), int(round(p / f_src))
        bx, by = int(round(width / f_out)), int(round(p / f_out))
        return self._read_array(name, src, xoff, yoff, xs, ys, buf_xsize=bx, buf_ysize=by,
                                resample_alg=alg)

    def _read_coarse(self, name: str, src: BandSource, y0: int, x0: int,
                     width: int) -> tuple[np.ndarray, np.ndarray]:
        """A 20/60 m band over the window [x0, x0+width) x [y0, y0+P): (its native pixels, the
        window up-sampled to 10 m by `bilinear_upsample`), from one read with a pixel of margin."""
        p, f = self.layout.patch_size, src.resolution_m // 10
        band = self._band(name, src)
        r0, r1 = max(y0 // f - 1, 0), min((y0 + p) // f + 1, band.YSize)
        c0, c1 = max(x0 // f - 1, 0), min((x0 + width) // f + 1, band.XSize)
        native = self._read_array(name, src, c0, r0, c1 - c0, r1 - r0)
        up = bilinear_upsample(native, r0, band.YSize, f, y0, p, width, band.GetNoDataValue(),
                               src_col0=c0, n_src_cols=band.XSize, col0=x0)
        rows, cols = y0 // f - r0, x0 // f - c0
        return native[rows:rows + p // f, cols:cols + width // f], up

    def read_row(self, prow: int, first_col: int, stop_col: int) -> Batch:
        """Patches [first_col, stop_col) of patch row `prow`, filtered and labelled.

        Every read is a window of exactly these columns (plus the up-sampling margin), so the
        values do not depend on how a row is cut. The filter runs first: bands other than the
        ones it needs are read only when a patch is kept, and only kept patches are copied out.
        """
        p, scene, layout = self.layout.patch_size, self.scene, self.layout
        y0, x0, k = prow * p, first_col * p, stop_col - first_col
        width = k * p
        # no-data test on the raw 10 m-native bands: optical ones if any, else SAR
        nodata_bands = {"l2a": S2_10M, "rgb": RGB_BANDS}.get(layout.optical or "",
                                                           layout.s1_bands)
        table = scene.s2 if layout.optical else scene.s1
        raw = {b: self._read(b, table[b], y0, x0, width) for b in nodata_bands}
        scl = None
        if scene.scl is not None:
            scl = cut_patches(self._read("SCL", scene.scl, y0, x0, width)[None], 0, k, p)[:, 0]
        raw10 = cut_patches(np.stack([raw[b] for b in nodata_bands]), 0, k, p)
        nod = nodata_fraction(raw10, scene.nodata, scl) > self.filt.max_nodata
        cloudy = ~nod & ((cloud_fraction(scl) > self.filt.max_cloud) if scl is not None
                         else np.zeros(k, bool))
        kept = np.flatnonzero(~nod & ~cloudy)
        n = len(kept)
        if n == 0:
            out = {name: np.empty((0, *row), dtype) for name, (row, dtype) in
                   layout.datasets().items()}
            return Batch(out, k, int(cloudy.sum()), int(nod.sum()))
        sel = None if n == k else kept

        def patches(strip: np.ndarray) -> np.ndarray:
            """(s, k*s) strip of one band -> view or copy (n, s, s) of the kept patches."""
            s = strip.shape[0]
            v = strip.reshape(s, k, s)
            return (v if sel is None else v[:, sel]).transpose(1, 0, 2)

        out = self._images(raw, y0, x0, width, n, patches)
        if scene.label_raster is not None:
            lab = patches(self._read("labels", scene.label_raster, y0, x0, width))
            label, multi = raster_labels(np.ascontiguousarray(lab), layout.n_classes,
                                         self.filt.min_class_fraction)
        elif scene.scene_classes is not None:
            label, multi = scene_labels(scene.scene_classes, layout.n_classes, n)
        else:
            label = np.full(n, -1, np.int16)
            multi = np.zeros((n, layout.n_classes), np.uint8)
        out["classes"], out["label"] = multi, label
        out["scene"] = np.full(n, self.index, np.int32)
        out["row"] = np.full(n, y0, np.int32)
        out["col"] = (kept.astype(np.int32) + first_col) * p
        return Batch(out, k, int(cloudy.sum()), int(nod.sum()))

    def _images(self, raw: dict[str, np.ndarray], y0: int, x0: int, width: int, n: int,
                patches) -> dict[str, np.ndarray]:
        """The image datasets of the kept patches, each band written once into its place; a
        20/60 m band is read once for both its native dataset and `data_super`."""
        scene, layout = self.scene, self.layout
        up: dict[str, np.ndarray] = {}  # 20/60 m bands up-sampled to 10 m, for data_super
        out: dict[str, np.ndarray] = {}
        for dname, (bands, res, dtype) in layout.image_datasets().items():
            if dname == "data_super":
                continue
            table = scene.s1 if dname == "s1" else scene.s2
            side = layout.patch_size * 10 // res
            arr = out[dname] = np.empty((n, len(bands), side, side), dtype)
            for i, b in enumerate(bands):
                src = table[b]
                if res == 10 and b in raw:
                    strip = raw[b]
                elif src.resolution_m == res > 10:  # native 20/60 m: one read for both
                    strip, up[b] = self._read_coarse(b, src, y0, x0, width)
                else:
                    strip = self._read(b, src, y0, x0, width, res)
                arr[:, i] = patches(to_stored(strip, src, dtype))
        if layout.optical == "l2a":
            arr = out["data_super"] = np.empty((n, len(S2_BANDS), layout.patch_size,
                                                layout.patch_size), SUPER_DTYPE)
            for i, b in enumerate(S2_BANDS):
                src = scene.s2[b]
                if src.resolution_m == 10:  # already at 10 m: no resampling
                    a = raw[b] if b in raw else self._read(b, src, y0, x0, width)
                else:
                    a = up[b] if b in up else self._read_coarse(b, src, y0, x0, width)[1]
                arr[:, i] = patches(to_stored(a, src, SUPER_DTYPE))
        return out

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(patch row, first col, stop col) covering row-major patch positions [start, stop),
        in runs of at most STRIP_PATCHES columns."""
        pos = start
        while pos < stop:
            prow, c0 = divmod(pos, self.n_cols)
            c1 = min(self.n_cols, c0 + stop - pos, c0 + STRIP_PATCHES)
            yield prow, c0, c1
            pos += c1 - c0

    def close(self) -> None:
        self._open.clear()


def tile_range(scene: Scene, scene_index: int, start: int, stop: int, layout: Layout,
               filt: FilterOptions) -> Iterator[Batch]:
    """Batches (one per patch row) for the scene's patches [start, stop) in row-major order."""
    tiler = SceneTiler(scene, scene_index, layout, filt)
    try:
        for prow, c0, c1 in tiler.rows(start, stop):
            yield tiler.read_row(prow, c0, c1)
    finally:
        tiler.close()
