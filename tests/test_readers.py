"""Input readers: every format on generated data and on the real samples, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess.readers import detect_format, discover, probe_candidates, read_name_list
from preprocess.readers.bigearthnet import CORINE_43
from preprocess.readers.raster import prefetched, probe_many
from preprocess.synth import SynthConfig, generate, write_geotiff

gdal.UseExceptions()
SAMPLES = "sentinel_samples"


def wkt(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def gt(x0: float, y0: float, res: float) -> tuple[float, ...]:
    return (x0, res, 0.0, y0, 0.0, -res)


def read_source(src) -> np.ndarray:
    """Physical values of a BandSource, as the tiler would compute them."""
    ds = gdal.Open(src.path)  # keep the dataset alive while its band is read
    a = ds.GetRasterBand(src.band_index).ReadAsArray().astype(np.float64)
    return (a + src.offset) * src.scale


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("readers") / "synth"
    generate(out, SynthConfig(scenes=2, size=180, size_spread=0.3, seed=0), command="test")
    return out


@pytest.fixture
def scene_copy(synth_set, tmp_path) -> tuple[Path, str, str]:
    """A writable copy of the synthetic set: (root, name of scene 0, name of scene 1)."""
    root = tmp_path / "set"
    shutil.copytree(synth_set, root)
    return root, "synth0_0000", "synth0_0001"


# ------------------------------------------------------------------ synthetic layout


def test_synthetic_reader(synth_set):
    assert detect_format(synth_set) == "synthetic"
    ss = discover(synth_set)
    assert ss.fmt == "synthetic" and [s.name for s in ss.scenes] == ["synth0_0000", "synth0_0001"]
    assert ss.class_names[:2] == ("water", "forest") and ss.s2_bands == B.S2_BANDS
    assert ss.s1_bands == ("VV", "VH") and ss.skipped == []
    s = ss.scenes[0]
    assert list(s.s2) == list(B.S2_BANDS) and list(s.s1) == ["VV", "VH"]
    assert all(s.s2[b].resolution_m == B.S2_RESOLUTION_M[b] for b in B.S2_BANDS)
    assert s.scl.resolution_m == 20 and s.label_raster.resolution_m == 10
    ds = gdal.Open(s.s2["B02"].path)
    assert (s.width, s.height) == (ds.RasterXSize, ds.RasterYSize)
    assert s.geotransform == ds.GetGeoTransform() and "UTM" in s.crs_wkt
    assert s.n_patches(60) == (s.width // 60) * (s.height // 60)


def test_per_resolution_layout_reads_same_values(tmp_path, synth_set):
    cfg = SynthConfig(scenes=2, size=180, size_spread=0.3, seed=0, layout="per-resolution")
    generate(tmp_path, cfg, command="test")
    a, b = discover(synth_set).scenes[1], discover(tmp_path).scenes[1]
    for band in ("B02", "B05", "B8A", "B12", "B09"):
        assert b.s2[band].path.endswith(f"_R{B.S2_RESOLUTION_M[band]}m.tif")
        assert np.array_equal(read_source(a.s2[band]), read_source(b.s2[band])), band


def test_exclusion_list(synth_set, tmp_path):
    lst = tmp_path / "exclude.csv"
    lst.write_text("# cloudy patches\nsynth0_0001,2017-01-01\n\n")
    assert read_name_list([lst]) == {"synth0_0001"}
    ss = discover(synth_set, exclude=lst)
    assert [s.name for s in ss.scenes] == ["synth0_0000"]
    with pytest.raises(UserError, match="missing.csv"):
        discover(synth_set, exclude=[tmp_path / "missing.csv"])


# ------------------------------------------------------------------ bad input


def test_truncated_geotiff(scene_copy):
    root, name, _ = scene_copy
    f = root / name / f"{name}_B03.tif"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match=rf"{name}_B03\.tif: .*truncated"):
        discover(root)


def test_probing_ahead_gives_the_same_scenes_and_errors(scene_copy, tmp_path):
    """Ranks probe the files a reader will probe (probe_candidates, probe_many) and the reader
    uses those results (prefetched): the same SceneSet, the same error, files opened once."""
    root, name, other = scene_copy
    files, config = probe_candidates(root)
    assert config == {} and len(files) == 2 * (12 + 4)  # 12 bands, SCL, label, VV, VH
    ahead = probe_many(files)
    assert set(ahead) == set(files)
    with prefetched(ahead):
        assert discover(root) == discover(root)  # the second call probes again
    bad = root / name / f"{name}_B03.tif"
    good = bad.read_bytes()
    bad.write_bytes(good[:1000])
    ahead = probe_many(files)
    assert ahead[str(bad)][0] == str(bad) and "truncated" in ahead[str(bad)][1]
    bad.write_bytes(good)  # the reader must take the prefetched answer, not open the file again
    with prefetched(ahead), pytest.raises(UserError, match=rf"{name}_B03\.tif: .*truncated"):
        discover(root)
    with prefetched(ahead):
        ss = discover(root, skip_bad=True)
    assert [s.name for s in ss.scenes] == [other] and "truncated" in ss.skipped[0][1]
    chips = tmp_path / "chips"
    make_chips(chips, {"Forest": 2})
    files, config = probe_candidates(chips)
    assert len(files) == 2 and config == {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
    assert probe_candidates(chips, fmt="safe") == ([], {})


def test_corrupt_header(scene_copy):
    root, name, _ = scene_copy
    f = root / name / f"{name}_B8A.tif"
    f.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(UserError, match=rf"{name}_B8A\.tif: GDAL cannot open it"):
        discover(root)


def test_missing_band(scene_copy):
    root, name, _ = scene_copy
    (root / name / f"{name}_B11.tif").unlink()
    with pytest.raises(UserError, match=rf"{name}: missing band\(s\) B11"):
        discover(root)


def _rewrite(path: Path, *, size_delta: int = 0, epsg: int | None = None, shift: float = 0.0):
    """Rewrite a single-band GeoTIFF with a changed size, CRS or origin (same values otherwise)."""
    ds = gdal.Open(str(path))
    a = ds.ReadAsArray()
    g = list(ds.GetGeoTransform())
    proj = ds.GetProjection() if epsg is None else wkt(epsg)
    name = ds.GetRasterBand(1).GetDescription()
    ds = None
    if size_delta:
        a = a[: a.shape[0] + size_delta, : a.shape[1] + size_delta]
    g[0] += shift
    path.unlink()
    write_geotiff(path, [a], [name], tuple(g), proj)


def test_size_mismatch(scene_copy):
    root, name, _ = scene_copy
    _rewrite(root / name / f"{name}_B05.tif", size_delta=-2)
    with pytest.raises(UserError, match=rf"{name}_B05\.tif: size mismatch"):
        discover(root)


def test_crs_mismatch(scene_copy):
    root, name, _ = scene_copy
    _rewrite(root / name / f"{name}_VH.tif", epsg=3035)
    with pytest.raises(UserError, match=rf"{name}_VH\.tif: CRS mismatch: EPSG:3035"):
        discover(root)


def test_extent_mismatch(scene_copy):
    root, name, _ = scene_copy
    _rewrite(root / name / f"{name}_B01.tif", shift=600.0)
    with pytest.raises(UserError, match=rf"{name}_B01\.tif: extent mismatch"):
        discover(root)


def test_skip_bad_records_and_continues(scene_copy):
    root, name, other = scene_copy
    (root / name / f"{name}_B12.tif").unlink()
    ss = discover(root, skip_bad=True)
    assert [s.name for s in ss.scenes] == [other]
    assert len(ss.skipped) == 1 and ss.skipped[0][0].endswith(name)
    assert "B12" in ss.skipped[0][1]
    (root / other / f"{other}_B02.tif").write_bytes(b"")
    with pytest.raises(UserError, match="all 2 synthetic scene"):
        discover(root, skip_bad=True)


def test_empty_and_unknown_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        discover(empty)
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nope")
    scene_file = tmp_path / "scene_B02.tif"
    scene_file.write_bytes(b"")
    for call in (discover, detect_format):  # a file is not reported as a missing folder
        with pytest.raises(UserError, match=r"scene_B02\.tif is a file; expected a folder"):
            call(scene_file)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"cannot tell the input format .*1 \.txt"):
        discover(tmp_path / "notes")
    with pytest.raises(UserError, match="unknown input format 'zarr'"):
        discover(tmp_path / "notes", fmt="zarr")
    with pytest.raises(UserError, match="no synthetic scenes found"):
        discover(tmp_path / "notes", fmt="synthetic")


# ------------------------------------------------------------------ BigEarthNet v1


def make_ben_patch(root: Path, name: str, labels: list[str], x0: float, s1_name: str | None,
                   epsg: int = 32633, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    d = root / "S2" / name
    d.mkdir(parents=True)
    for band in B.S2_BANDS:
        n = 120 // (B.S2_RESOLUTION_M[band] // 10)
        a = rng.integers(1, 5000, size=(n, n), dtype=np.uint16)
        write_geotiff(d / f"{name}_{band}.tif", [a], [band],
                      gt(x0, 5_000_000, B.S2_RESOLUTION_M[band]), wkt(epsg))
    (d / f"{name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    if s1_name:
        d1 = root / "S1" / s1_name
        d1.mkdir(parents=True)
        for pol in B.S1_BANDS:
            a = rng.normal(-12, 3, size=(120, 120)).astype(np.float32)
            write_geotiff(d1 / f"{s1_name}_{pol}.tif", [a], [pol], gt(x0, 5_000_000, 10),
                          wkt(epsg))
        (d1 / f"{s1_name}_labels_metadata.json").write_text(
            json.dumps({"labels": labels, "corresponding_s2_patch": name}))


@pytest.fixture
def ben(tmp_path) -> Path:
    root = tmp_path / "ben"
    make_ben_patch(root, "S2A_MSIL2A_20170613T101031_1_1", ["Pastures", "Sea and ocean"],
                   400_000, "S1A_IW_GRDH_1SDV_20170613T165043_1_1")
    make_ben_patch(root, "S2A_MSIL2A_20170613T101031_1_2", ["Coniferous forest"], 401_200,
                   "S1A_IW_GRDH_1SDV_20170613T165043_1_2", seed=1)
    return root


def test_bigearthnet_reader(ben, tmp_path):
    assert detect_format(ben) == "bigearthnet"
    ss = discover(ben)
    assert ss.fmt == "bigearthnet" and ss.class_names == CORINE_43 and len(CORINE_43) == 43
    assert ss.s1_bands == ("VV", "VH")
    s = ss.scenes[0]
    assert {ss.class_names[i] for i in s.scene_classes} == {"Pastures", "Sea and ocean"}
    assert s.s1["VV"].path.endswith("S1A_IW_GRDH_1SDV_20170613T165043_1_1_VV.tif")
    assert s.s2["B01"].resolution_m == 60 and (s.width, s.height) == (120, 120)
    union = discover(ben, classes="union")
    assert union.class_names == ("Coniferous forest", "Pastures", "Sea and ocean")
    assert union.scenes[1].scene_classes == (0,)
    lst = tmp_path / "patches_with_cloud_and_shadow.csv"
    lst.write_text("S1A_IW_GRDH_1SDV_20170613T165043_1_2\n")  # the S1 name drops the pair too
    assert [s.name for s in discover(ben, exclude=lst).scenes] == [
        "S2A_MSIL2A_20170613T101031_1_1"]


def test_bigearthnet_bad_inputs(ben):
    meta = ben / "S2/S2A_MSIL2A_20170613T101031_1_2/S2A_MSIL2A_20170613T101031_1_2" \
                 "_labels_metadata.json"
    meta.write_text(json.dumps({"labels": ["Moon craters"]}))
    with pytest.raises(UserError, match=r"_1_2_labels_metadata\.json: label\(s\) not in the 43"):
        discover(ben)
    meta.write_text(json.dumps({"labels": ["Pastures"]}))
    shutil.rmtree(ben / "S1" / "S1A_IW_GRDH_1SDV_20170613T165043_1_1")
    with pytest.raises(UserError, match=r"_1_1: no Sentinel-1 patch names this patch"):
        discover(ben)
    ss = discover(ben, skip_bad=True)
    assert [s.name for s in ss.scenes] == ["S2A_MSIL2A_20170613T101031_1_2"]
    assert "Sentinel-1" in ss.skipped[0][1]
    with pytest.raises(UserError, match="classes must be"):
        discover(ben, classes="some")


@pytest.mark.realdata
def test_bigearthnet_real_sample(shared_data):
    root = shared_data / SAMPLES / "BigEarthNet-v1-examples"
    ss = discover(root)
    assert ss.fmt == "bigearthnet" and len(ss.scenes) == 6 and ss.s1_bands == ("VV", "VH")
    by_name = {s.name: s for s in ss.scenes}
    s = by_name["S2B_MSIL2A_20180204T94161_57_38"]
    assert [ss.class_names[i] for i in s.scene_classes] == [
        "Non-irrigated arable land", "Coniferous forest", "Mixed forest"]
    assert "S1A_IW_GRDH_1SDV_20180204T043253_35VPK_57_38" in s.s1["VH"].path
    assert (s.width, s.height) == (120, 120) and s.s2["B09"].resolution_m == 60
    assert read_source(s.s2["B02"]).shape == (120, 120)


# ------------------------------------------------------------------ Sentinel-2 L2A SAFE


MTD_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<n1:Level-2A_User_Product xmlns:n1="https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-2A.xsd">
<n1:General_Info><Product_Image_Characteristics>
<QUANTIFICATION_VALUES_LIST>
<BOA_QUANTIFICATION_VALUE unit="none">{q}</BOA_QUANTIFICATION_VALUE>
</QUANTIFICATION_VALUES_LIST>
<BOA_ADD_OFFSET_VALUES_LIST>{offsets}</BOA_ADD_OFFSET_VALUES_LIST>
</Product_Image_Characteristics></n1:General_Info></n1:Level-2A_User_Product>
"""


def make_safe(root: Path, name: str, offset: int = -1000, q: int = 10000, jp2: bool = False,
              skip: tuple[str, ...] = ()) -> Path:
    """A tiny L2A product: GeoTIFF content under .jp2 names (or real JPEG2000 for B02)."""
    product = root / f"{name}.SAFE"
    img = product / "GRANULE" / "L2A_T33UUP_A000001_20220101T100000" / "IMG_DATA"
    offsets = "".join(f'<BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>'
                      for i in range(13))
    product.mkdir(parents=True)
    (product / "MTD_MSIL2A.xml").write_text(MTD_TEMPLATE.format(q=q, offsets=offsets))
    rng = np.random.default_rng(0)
    for res in (10, 20, 60):
        (img / f"R{res}m").mkdir(parents=True)
    files = [(b, B.S2_RESOLUTION_M[b]) for b in B.S2_BANDS] + [("SCL", 20), ("B02", 20),
                                                                ("B02", 60), ("B05", 60)]
    for band, res in files:
        if band in skip:
            continue
        n = 120 // (res // 10)
        a = rng.integers(1000, 4000, size=(n, n), dtype=np.uint16)
        if band == "SCL":
            a = np.full((n, n), 4, dtype=np.uint8)
        path = img / f"R{res}m" / f"T33UUP_20220101T100000_{band}_{res}m.jp2"
        g = gt(300_000, 5_100_000, res)
        if jp2 and band == "B02" and res == 10 and gdal.GetDriverByName("JP2OpenJPEG"):
            mem = gdal.GetDriverByName("MEM").Create("", n, n, 1, gdal.GDT_UInt16)
            mem.SetGeoTransform(g)
            mem.SetProjection(wkt(32633))
            mem.GetRasterBand(1).WriteArray(a)
            gdal.GetDriverByName("JP2OpenJPEG").CreateCopy(str(path), mem, options=["QUALITY=100",
                                                                                  "REVERSIBLE=YES"])
        else:
            write_geotiff(path, [a], [band], g, wkt(32633))
    return product


def test_safe_reader(tmp_path):
    make_safe(tmp_path, "S2B_MSIL2A_20220101T100000_N0400_R022_T33UUP_20220101T120000", jp2=True)
    make_safe(tmp_path, "S2A_MSIL2A_20180101T100000_N0206_R022_T33UUP_20180101T120000",
              offset=0, q=10000)
    assert detect_format(tmp_path) == "safe"
    ss = discover(tmp_path)
    assert [s.name[:4] for s in ss.scenes] == ["S2A_", "S2B_"]
    old, new = ss.scenes
    assert new.s2["B02"].offset == -1000 and new.s2["B02"].scale == 1.0
    assert old.s2["B12"].offset == 0
    assert new.s2["B02"].path.endswith("R10m/T33UUP_20220101T100000_B02_10m.jp2")
    assert new.s2["B05"].path.endswith("_B05_20m.jp2") and new.s2["B05"].resolution_m == 20
    assert new.s2["B09"].resolution_m == 60 and new.scl.path.endswith("_SCL_20m.jp2")
    if gdal.GetDriverByName("JP2OpenJPEG"):
        assert gdal.Open(new.s2["B02"].path).GetDriver().ShortName == "JP2OpenJPEG"
    raw = gdal.Open(new.s2["B03"].path).ReadAsArray().astype(float)
    assert np.allclose(read_source(new.s2["B03"]), raw - 1000)
    # A single product folder works as input too, with a quantification other than 10000.
    one = make_safe(tmp_path / "q", "S2A_MSIL2A_X", q=20000)
    assert discover(one).scenes[0].s2["B04"].scale == 0.5


def test_safe_bad_inputs(tmp_path):
    make_safe(tmp_path, "S2A_MSIL2A_MISSING", skip=("B8A",))
    with pytest.raises(UserError, match=r"S2A_MSIL2A_MISSING\.SAFE: missing band\(s\) B8A"):
        discover(tmp_path, fmt="safe")
    shutil.rmtree(tmp_path / "S2A_MSIL2A_MISSING.SAFE")
    p = make_safe(tmp_path, "S2A_MSIL2A_BADXML")
    (p / "MTD_MSIL2A.xml").write_text("<not-closed>")
    with pytest.raises(UserError, match=r"MTD_MSIL2A\.xml: cannot parse"):
        discover(tmp_path)


# ------------------------------------------------------------------ Sentinel-1


def test_s1_reader_db_and_linear(tmp_path):
    rng = np.random.default_rng(0)
    lin = rng.gamma(4.0, 0.05 / 4.0, size=(2, 90, 120)).astype(np.float32)
    g = gt(500_000, 4_000_000, 10)
    (tmp_path / "lin").mkdir()
    for pol, a in zip(B.S1_BANDS, lin, strict=True):
        write_geotiff(tmp_path / "lin" / f"scene_{pol}.tif", [a], [pol], g, wkt(32632))
        write_geotiff(tmp_path / "lin" / f"other_{pol}_db.tif",
                      [10 * np.log10(a)], [pol], g, wkt(32632))
    assert detect_format(tmp_path / "lin") == "s1"
    ss = discover(tmp_path / "lin")
    assert ss.fmt == "s1" and ss.s1_bands == ("VV", "VH") and ss.s2_bands == ()
    assert [s.name for s in ss.scenes] == ["other_db", "scene"]
    as_db, converted = ss.scenes
    assert as_db.s1["VV"].path.endswith("other_VV_db.tif")  # already dB: the file itself
    assert converted.s1["VH"].path.startswith("<VRTDataset")  # linear: a dB VRT
    assert np.allclose(read_source(converted.s1["VH"]), 10 * np.log10(lin[1]), atol=1e-4)
    assert converted.geotransform == g and (converted.width, converted.height) == (120, 90)


def test_s1_grd_with_gcps_is_warped(tmp_path):
    product = tmp_path / "S1A_IW_GRDH_1SDV_20200101T000000_TEST.SAFE"
    (product / "measurement").mkdir(parents=True)
    (product / "annotation" / "calibration").mkdir(parents=True)
    g4326 = osr.SpatialReference()
    g4326.ImportFromEPSG(4326)
    rng = np.random.default_rng(0)
    for pol in ("vv", "vh"):
        dn = rng.integers(50, 400, size=(80, 100), dtype=np.uint16)
        path = product / "measurement" / f"s1a-iw-grd-{pol}-20200101t000000-001.tiff"
        ds = gdal.GetDriverByName("GTiff").Create(str(path), 100, 80, 1, gdal.GDT_UInt16)
        ds.GetRasterBand(1).WriteArray(dn)
        gcps = [gdal.GCP(9.0 + 0.012 * x / 100 + 0.001 * y / 80, 45.0 - 0.007 * y / 80, 0.0,
                         float(x), float(y)) for x in (0, 50, 100) for y in (0, 40, 80)]
        ds.SetGCPs(gcps, g4326.ExportToWkt())
        ds = None
        (product / "annotation" / "calibration" / f"calibration-s1a-iw-grd-{pol}-x.xml"
         ).write_text("<calibration><calibrationVectorList><calibrationVector>"
                      "<sigmaNought>100.0 100.0 100.0</sigmaNought>"
                      "</calibrationVector></calibrationVectorList></calibration>")
    assert detect_format(tmp_path) == "s1"
    ss = discover(tmp_path)
    (s,) = ss.scenes
    assert s.s1["VV"].offset == pytest.approx(-40.0)  # -20 log10(100)
    srs = osr.SpatialReference(wkt=s.crs_wkt)
    srs.AutoIdentifyEPSG()
    assert srs.GetAuthorityCode(None) == "32632" and s.geotransform[1] == 10.0
    vv = gdal.Open(s.s1["VV"].path)
    vh = gdal.Open(s.s1["VH"].path)
    assert (vv.RasterXSize, vv.RasterYSize) == (vh.RasterXSize, vh.RasterYSize)
    assert vv.GetGeoTransform() == vh.GetGeoTransform() == s.geotransform
    a = read_source(s.s1["VV"])
    valid = np.isfinite(a)
    assert valid.mean() > 0.5
    assert -10 < np.median(a[valid]) < 20  # 20 log10(50..400) - 40 dB


def test_s1_bad_inputs(tmp_path):
    g = gt(500_000, 4_000_000, 10)
    a = np.full((60, 60), -10.0, dtype=np.float32)
    write_geotiff(tmp_path / "x_VV.tif", [a], ["VV"], g, wkt(32632))
    write_geotiff(tmp_path / "x_VH.tif", [a[:, :50]], ["VH"], g, wkt(32632))
    with pytest.raises(UserError, match=r"x_VH\.tif: size mismatch"):
        discover(tmp_path)
    write_geotiff(tmp_path / "y_VV.tif", [a], ["VV"], g, wkt(32632))  # VH missing
    for pol in B.S1_BANDS:
        write_geotiff(tmp_path / f"z_{pol}.tif", [a], [pol], g, wkt(32632))
    ss = discover(tmp_path, fmt="s1", skip_bad=True)
    assert [s.name for s in ss.scenes] == ["z"]
    assert [(Path(p).name, r.split(":")[0]) for p, r in ss.skipped] == [
        ("x_VH.tif", "size mismatch"), ("y_VV.tif", "missing polarisation(s) VH")]


@pytest.mark.realdata
def test_s1_real_sample(shared_data):
    ss = discover(shared_data / SAMPLES / "pyroSAR")
    (s,) = ss.scenes
    assert ss.fmt == "s1" and ss.s1_bands == ("VV",) and (s.width, s.height) == (268, 217)
    assert s.s1["VV"].path.endswith("_db.tif") and "UTM zone 31N" in s.crs_wkt


# ------------------------------------------------------------------ chips


def make_chips(root: Path, classes: dict[str, int], bands: int = 3) -> None:
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            if bands == 3:
                mem = gdal.GetDriverByName("MEM").Create("", 64, 64, 3, gdal.GDT_Byte)
                for b in range(3):
                    mem.GetRasterBand(b + 1).WriteArray(rng.integers(0, 255, (64, 64),
                                                                     dtype=np.uint8))
                gdal.GetDriverByName("JPEG").CreateCopy(str(root / cls / f"{cls}_{i}.jpg"), mem)
            else:
                arrays = [rng.integers(1, 3000, (64, 64), dtype=np.uint16) for _ in range(bands)]
                write_geotiff(root / cls / f"{cls}_{i}.tif", arrays, [""] * bands,
                              gt(400_000, 6_000_000, 10), wkt(32635))


def test_chips_rgb(tmp_path):
    make_chips(tmp_path, {"Forest": 3, "AnnualCrop": 2})
    assert detect_format(tmp_path) == "chips"
    ss = discover(tmp_path)
    assert ss.class_names == ("AnnualCrop", "Forest") and ss.s2_bands == ("R", "G", "B")
    assert [s.name for s in ss.scenes] == ["AnnualCrop/AnnualCrop_0", "AnnualCrop/AnnualCrop_1",
                                           "Forest/Forest_0", "Forest/Forest_1", "Forest/Forest_2"]
    assert [s.scene_classes for s in ss.scenes] == [(0,), (0,), (1,), (1,), (1,)]
    s = ss.scenes[2]
    assert (s.width, s.height) == (64, 64) and s.s2["B"].band_index == 3


def test_chips_multispectral_and_bad(tmp_path):
    make_chips(tmp_path / "ms", {"SeaLake": 2}, bands=13)
    ss = discover(tmp_path / "ms")
    assert ss.s2_bands == B.S2_BANDS and "B10" not in ss.scenes[0].s2
    assert ss.scenes[0].s2["B8A"].band_index == 13 and ss.scenes[0].s2["B11"].band_index == 11
    make_chips(tmp_path / "rgb", {"River": 2})
    bad = tmp_path / "rgb" / "River" / "River_1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(UserError, match=r"River_1\.jpg: "):
        discover(tmp_path / "rgb")
    ss = discover(tmp_path / "rgb", skip_bad=True)
    assert [s.name for s in ss.scenes] == ["River/River_0"] and ss.skipped[0][0] == str(bad)
    make_chips(tmp_path / "rgb" / "x", {"Lake": 1}, bands=13)
    shutil.move(tmp_path / "rgb" / "x" / "Lake", tmp_path / "rgb" / "Lake")
    with pytest.raises(UserError, match="RGB and multispectral chips are mixed"):
        discover(tmp_path / "rgb", skip_bad=True)
    make_chips(tmp_path / "five", {"Odd": 1}, bands=5)
    with pytest.raises(UserError, match=r"Odd_0\.tif: 5 bands"):
        discover(tmp_path / "five")


@pytest.mark.realdata
def test_chips_real_eurosat_ms(shared_data):
    ss = discover(shared_data / SAMPLES / "EuroSAT_MS")
    assert ss.class_names == ("AnnualCrop", "Pasture", "SeaLake") and len(ss.scenes) == 3
    sea = ss.scenes[2]
    nir, blue = read_source(sea.s2["B08"]).mean(), read_source(sea.s2["B02"]).mean()
    assert nir < blue  # water: the band mapping puts the NIR band where it belongs


@pytest.mark.realdata
@pytest.mark.slow
def test_chips_real_eurosat_rgb(shared_data):
    ss = discover(shared_data / "eurosat_rgb")
    assert len(ss.scenes) == 27_000 and len(ss.class_names) == 10 and ss.skipped == []
    counts = np.bincount([s.scene_classes[0] for s in ss.scenes])
    assert dict(zip(ss.class_names, counts.tolist(), strict=True))["Pasture"] == 2000


# ------------------------------------------------------------------ Major-TOM and other samples


def test_majortom_layout_is_detected_and_recorded(tmp_path, synth_set):
    """Major-TOM cells (<row>U/<row>U_<col>R/<product>/B01.tif, no file-name prefix) are read by
    the per-band reader and recorded as `majortom`, not as the synthetic layout."""
    product = tmp_path / "S2L2A" / "0U" / "0U_199R" / "S2A_MSIL2A_20220706T085611_N0400"
    product.mkdir(parents=True)
    for f in synth_set.glob("synth0_0000/synth0_0000_B*.tif"):
        shutil.copy(f, product / f.name.removeprefix("synth0_0000_"))
    root = tmp_path / "S2L2A"
    assert detect_format(root) == "majortom"
    assert detect_format(tmp_path / "S2L2A" / "0U") == "majortom"
    ss = discover(root)
    assert ss.fmt == "majortom" and [s.name for s in ss.scenes] == [
        "0U/0U_199R/S2A_MSIL2A_20220706T085611_N0400"]
    assert discover(root, fmt="majortom").scenes == ss.scenes
    assert discover(root, fmt="synthetic").fmt == "synthetic"  # an explicit choice is kept
    assert detect_format(synth_set) == "synthetic"


@pytest.mark.realdata
def test_majortom_real_sample(shared_data):
    root = shared_data / SAMPLES / "Major-TOM-Core" / "S2L2A"
    ss = discover(root)
    assert ss.fmt == "majortom" and len(ss.scenes) == 2 and ss.class_names == ()
    assert discover(root, fmt="majortom").scenes == ss.scenes
    s = ss.scenes[0]
    assert (s.width, s.height) == (1068, 1068)
    assert [s.s2[b].resolution_m for b in ("B02", "B05", "B01")] == [10, 20, 60]
    assert s.scl is None and s.label_raster is None


@pytest.mark.realdata
def test_real_samples_detected(shared_data):
    root = shared_data / SAMPLES
    assert detect_format(root / "BigEarthNet-v1-examples") == "bigearthnet"
    assert detect_format(root / "EuroSAT_MS") == "chips"
    assert detect_format(root / "pyroSAR") == "s1"
    assert detect_format(root / "Major-TOM-Core") == "majortom"
    with pytest.raises(UserError, match=r"cannot tell the input format .*7 \.tif"):
        detect_format(root / "Hydro")
