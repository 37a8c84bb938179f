"""Tiling: up-sampling equal to gdalwarp, range independence, filter, labels, bad inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from geotiff_scenes import CLASSES, default_labels, scene_set, write_scene
from osgeo import gdal

from hpcsrl.data.bands import S2_10M, S2_20M, S2_60M, S2_BANDS
from hpcsrl.errors import UserError
from preprocess.scene import BandSource, SceneSet
from preprocess.tiling import (
    FilterOptions,
    Layout,
    bilinear_upsample,
    cloud_fraction,
    cut_patches,
    layout_for,
    nodata_fraction,
    raster_labels,
    scene_labels,
    tile_range,
    to_stored,
)

P = 60
W, H = 180, 120  # 3 x 2 patches of 60 px


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("scene"), "S", W, H, seed=3,
                       labels=default_labels(W, H), s1=True)


KEEP_ALL = FilterOptions(max_nodata=1.0)


def tile_all(scene, start=0, stop=None, filt=KEEP_ALL, s1=True):
    layout = layout_for(scene_set([scene], s1=s1), P)
    stop = scene.n_patches(P) if stop is None else stop
    batches = list(tile_range(scene, 0, start, stop, layout, filt))
    return {k: np.concatenate([b.arrays[k] for b in batches]) for k in batches[0].arrays}, batches


def _warp(src: str, path, output_type: int) -> np.ndarray:
    return gdal.Warp(str(path), src, xRes=10, yRes=10, resampleAlg="bilinear",
                     outputType=output_type).ReadAsArray()


def test_bilinear_kernel_is_bit_equal_to_gdalwarp_float32(scene, tmp_path):
    for b in (*S2_20M, *S2_60M):
        src = scene.s2[b]
        native = gdal.Open(src.path).ReadAsArray()
        f = src.resolution_m // 10
        got = bilinear_upsample(native, 0, native.shape[0], f, 0, H, W, None)
        np.testing.assert_array_equal(got, _warp(src.path, tmp_path / "f.tif", gdal.GDT_Float32))


def test_data_super_is_gdalwarp_float32_rounded_half_up(scene, tmp_path):
    """Patch by patch, the stored uint16 `data_super` is gdalwarp's Float32 output of the whole
    band rounded half up, so patch and strip boundaries leave no seam. gdalwarp's own UInt16
    output is the same for the 20 m bands; for the 60 m bands it differs on exact .5 ties only
    (its internal float arithmetic lands them on either side)."""
    out, _ = tile_all(scene)
    assert out["data_super"].shape == (6, 12, P, P) and out["data_super"].dtype == np.uint16
    for b in (*S2_20M, *S2_60M):
        src = scene.s2[b].path
        exact = _warp(src, tmp_path / "f.tif", gdal.GDT_Float32).astype(np.float64)
        gdal_u16 = _warp(src, tmp_path / "w.tif", gdal.GDT_UInt16)
        rounded = np.floor(exact + 0.5)
        differ = gdal_u16 != rounded
        if b in S2_20M:
            assert not differ.any(), b
        else:
            assert np.all(exact[differ] % 1 == 0.5), b
            assert np.all(rounded[differ] - gdal_u16[differ] == 1), b
        ch = S2_BANDS.index(b)
        for i, (row, col) in enumerate(zip(out["row"], out["col"], strict=True)):
            np.testing.assert_array_equal(out["data_super"][i, ch],
                                          rounded[row:row + P, col:col + P], err_msg=b)


def test_native_datasets_are_the_source_pixels(scene):
    out, _ = tile_all(scene)
    for name, bands, f in (("data_10m", S2_10M, 1), ("data_20m", S2_20M, 2),
                           ("data_60m", S2_60M, 6)):
        assert out[name].dtype == np.uint16 and out[name].shape == (6, len(bands), P // f, P // f)
        for ch, b in enumerate(bands):
            full = gdal.Open(scene.s2[b].path).ReadAsArray()
            for i, (row, col) in enumerate(zip(out["row"], out["col"], strict=True)):
                np.testing.assert_array_equal(
                    out[name][i, ch], full[row // f:(row + P) // f, col // f:(col + P) // f])
    for ch, b in enumerate(S2_10M):  # 10 m bands enter data_super unchanged
        np.testing.assert_array_equal(out["data_super"][:, S2_BANDS.index(b)],
                                      out["data_10m"][:, ch])
    vv = gdal.Open(scene.s1["VV"].path).ReadAsArray()
    np.testing.assert_array_equal(out["s1"][4, 0], vv[60:120, 60:120])
    assert list(out["row"]) == [0, 0, 0, 60, 60, 60] and list(out["col"]) == [0, 60, 120] * 2


def test_values_do_not_depend_on_which_range_reads_them(scene):
    full, _ = tile_all(scene)
    part, batches = tile_all(scene, start=2, stop=5)  # starts mid-row, ends mid-row
    assert [b.n_seen for b in batches] == [1, 2]
    for k in full:
        np.testing.assert_array_equal(part[k], full[k][2:5])


def test_labels_majority_and_multi_hot(scene):
    out, _ = tile_all(scene)
    # class stripes at x 0-60 (0), 60-120 (1), 120-180 (2); top-left corner unlabelled
    assert list(out["label"]) == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(out["classes"], np.tile(np.eye(3, dtype=np.uint8), (2, 1)))


def test_cloud_and_nodata_filters(tmp_path):
    scl = np.full((H // 2, W // 2), 4, np.uint8)
    scl[:30, :30] = 9  # patch 0 fully cloudy (SCL at 20 m)
    scl[30:, 30:33] = 8  # patch 4: 3 of 30 columns -> 10 % cloud
    scl[0, 60] = 0  # patch 2: one 20 m no-data pixel = 4 of 3600 10 m pixels
    sc = write_scene(tmp_path, "C", W, H, seed=1, scl=scl, nodata_box=(60, 0, 66, 6))
    layout = layout_for(scene_set([sc]), P)
    batches = list(tile_range(sc, 0, 0, 6, layout, FilterOptions(max_cloud=0.1, max_nodata=0.0)))
    cols = [(int(r), int(c)) for b in batches for r, c in zip(b.arrays["row"], b.arrays["col"],
                                                              strict=True)]
    assert cols == [(60, 0), (60, 60), (60, 120)]  # 0 cloudy, 1 and 2 with no-data dropped
    assert sum(b.dropped_cloud for b in batches) == 1
    assert sum(b.dropped_nodata for b in batches) == 2
    lenient = list(tile_range(sc, 0, 0, 6, layout, FilterOptions(max_cloud=0.05, max_nodata=0.01)))
    kept = [(int(r), int(c)) for b in lenient for r, c in zip(b.arrays["row"], b.arrays["col"],
                                                              strict=True)]
    assert kept == [(0, 60), (0, 120), (60, 0), (60, 120)]
    assert all(int(lab) == -1 for b in lenient for lab in b.arrays["label"])  # no label source


def test_pure_helpers():
    strip = np.arange(2 * 3 * 9).reshape(2, 3, 9)
    p = cut_patches(strip, 1, 3, 3)
    assert p.shape == (2, 2, 3, 3) and p.flags.c_contiguous
    np.testing.assert_array_equal(p[1], strip[:, :, 6:9])
    scl = np.array([[[3, 4], [8, 4]], [[0, 4], [4, 4]]])
    np.testing.assert_allclose(cloud_fraction(scl), [0.5, 0.0])
    bands = np.array([[[[0, 5], [0, 0]], [[0, 0], [7, 0]]]])  # (1, 2, 2, 2)
    np.testing.assert_allclose(nodata_fraction(bands, 0.0), [0.5])
    np.testing.assert_allclose(nodata_fraction(bands, 0.0, np.array([[[1, 0], [1, 1]]])), [0.75])
    nan = np.array([[[[np.nan, 1.0]]]])
    np.testing.assert_allclose(nodata_fraction(nan, float("nan")), [0.5])
    assert nodata_fraction(bands, None).tolist() == [0.0]
    lab = np.array([[[1, 1], [2, 255]], [[255, 255], [255, 255]], [[0, 2], [2, 0]]])
    single, multi = raster_labels(lab, 3, 0.3)
    assert single.tolist() == [1, -1, 0]  # tie 0/2 -> lower index
    assert multi.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 1]]
    s, m = scene_labels((2,), 3, 2)
    assert s.tolist() == [2, 2] and m.tolist() == [[0, 0, 1]] * 2
    s, m = scene_labels((0, 2), 3, 1)
    assert s.tolist() == [-1] and m.tolist() == [[1, 0, 1]]
    dn = np.array([900, 1000, 12000], np.uint16)
    got = to_stored(dn, BandSource("x", offset=-1000.0), np.dtype(np.uint16))
    assert got.tolist() == [0, 0, 11000]
    up = np.array([0.5, 1.5, 2.5, 2.4999, 70000.0])  # up-sampled values: half up, as GDAL
    assert to_stored(up, BandSource("x"), np.dtype(np.uint16)).tolist() == [1, 2, 3, 2, 65535]


def test_layout_rules():
    base = SceneSet([], CLASSES, "t", S2_BANDS)
    lay = layout_for(base, 120)
    assert lay == Layout("l2a", (), 120, 3)
    assert lay.datasets()["data_60m"] == ((2, 20, 20), np.dtype(np.uint16))
    with pytest.raises(UserError, match="multiple of 6"):
        layout_for(base, 64)
    assert layout_for(replace(base, s2_bands=("R", "G", "B")), 64).optical == "rgb"
    assert layout_for(replace(base, s2_bands=(), s1_bands=("VV", "VH")), 64).s1_bands == ("VV",
                                                                                          "VH")
    with pytest.raises(UserError, match="missing B01"):
        layout_for(replace(base, s2_bands=S2_BANDS[1:]), 120)


def test_bad_inputs_name_the_file(tmp_path):
    sc = write_scene(tmp_path / "a", "A", W, H, seed=2)
    layout = layout_for(scene_set([sc]), P)
    b05 = sc.s2["B05"].path
    # truncated GeoTIFF: cut the file in half
    data = open(b05, "rb").read()
    open(b05, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="A_B05.tif"):
        list(tile_range(sc, 0, 0, 6, layout, FilterOptions()))
    # a band of the wrong size
    sc2 = write_scene(tmp_path / "b", "B", W, H, seed=2)
    wrong = replace(sc2, s2={**sc2.s2, "B01": replace(sc2.s2["B05"], resolution_m=60)})
    with pytest.raises(UserError, match=r"B_B05\.tif: band B01 is 90x60 pixels at 60 m"):
        list(tile_range(wrong, 0, 0, 6, layout, FilterOptions()))
    missing = replace(sc2, s2={k: v for k, v in sc2.s2.items() if k != "B09"})
    with pytest.raises(UserError, match="scene B: missing band"):
        list(tile_range(missing, 0, 0, 6, layout, FilterOptions()))
