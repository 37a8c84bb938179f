"""Synthetic scene generator: determinism, georeferencing, value ranges, classes, clouds vs SCL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from hpcsrl.cli.main import main as cli_main
from hpcsrl.data import bands as B
from hpcsrl.errors import UserError
from preprocess import synth
from preprocess.synth import SynthConfig, draw_size, generate, render_scene

gdal.UseExceptions()
SMALL = SynthConfig(scenes=3, size=240, size_spread=0.5, seed=0)


def read(path: Path) -> np.ndarray:
    return gdal.Open(str(path)).ReadAsArray()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, SMALL, command="test")
    return out


@pytest.fixture(scope="module")
def messy_scene() -> synth.RenderedScene:
    """A scene with clouds, shadows and no-data all present (searched deterministically)."""
    cfg = SynthConfig(size=360, size_spread=0.0, cloud_fraction=0.3, nodata_fraction=0.3, seed=5)
    for i in range(20):
        s = render_scene(cfg, i)
        st = s.stats
        if st["cloud_fraction"] > 0.05 and st["nodata_fraction"] > 0.02 and st["shadow_fraction"]:
            return s
    raise AssertionError("no scene with clouds, shadows and no-data in 20 draws")


def test_files_and_manifest(small_set):
    manifest = json.loads((small_set / "manifest.json").read_text())
    assert manifest["format"] == "hpcsrl-synth" and manifest["command"] == "test"
    assert manifest["params"]["seed"] == 0 and len(manifest["scenes"]) == 3
    assert json.loads((small_set / "classes.json").read_text()) == SMALL.class_names
    assert SMALL.class_names[:3] == ["water", "forest", "cropland"]
    for entry in manifest["scenes"]:
        name = entry["name"]
        names = sorted(p.name for p in (small_set / name).iterdir())
        expected = sorted([f"{name}_{b}.tif" for b in B.S2_BANDS]
                          + [f"{name}_{x}.tif" for x in ("SCL", "label", "VV", "VH")])
        assert names == expected
    assert not list(small_set.glob(".*"))  # no temp folders left


def test_same_seed_gives_identical_bytes(small_set, tmp_path):
    again = tmp_path / "again"
    generate(again, SMALL, command="test")
    for f in sorted(small_set.rglob("*.tif")):
        assert f.read_bytes() == (again / f.relative_to(small_set)).read_bytes(), f.name
    other = render_scene(SynthConfig(**{**SMALL.__dict__, "seed": 1}), 0)
    same = render_scene(SMALL, 0)
    assert other.s2["B02"].shape != same.s2["B02"].shape or not np.array_equal(
        other.s2["B02"], same.s2["B02"])


def test_scene_does_not_depend_on_scene_count():
    one = render_scene(SynthConfig(scenes=1, size=240, seed=3), 0)
    many = render_scene(SynthConfig(scenes=9, size=240, seed=3), 0)
    assert np.array_equal(one.s2["B8A"], many.s2["B8A"]) and np.array_equal(one.label, many.label)


def test_georeferencing(small_set):
    for scene_dir in sorted(p for p in small_set.iterdir() if p.is_dir()):
        n = scene_dir.name
        ref = gdal.Open(str(scene_dir / f"{n}_B02.tif"))
        w, h = ref.RasterXSize, ref.RasterYSize
        assert w % 60 == 0 and h % 60 == 0
        gt = ref.GetGeoTransform()
        assert gt[1] == 10 and gt[5] == -10 and gt[0] % 60 == 0 and gt[3] % 60 == 0
        srs = osr.SpatialReference(wkt=ref.GetProjection())
        srs.AutoIdentifyEPSG()
        assert srs.GetAuthorityName(None) == "EPSG"
        assert 32601 <= int(srs.GetAuthorityCode(None)) <= 32660
        for suffix, res in [("B05", 20), ("B01", 60), ("SCL", 20), ("label", 10), ("VV", 10)]:
            ds = gdal.Open(str(scene_dir / f"{n}_{suffix}.tif"))
            f = res // 10
            assert (ds.RasterXSize, ds.RasterYSize) == (w // f, h // f)
            g = ds.GetGeoTransform()
            assert (g[0], g[3], g[1], g[5]) == (gt[0], gt[3], res, -res)
            assert ds.GetRasterBand(1).GetDescription() == suffix
            assert osr.SpatialReference(wkt=ds.GetProjection()).IsSame(srs)


def test_value_ranges_and_types(small_set):
    scene_dir = small_set / "synth0_0000"
    scl = read(scene_dir / "synth0_0000_SCL.tif")
    clear20 = np.isin(scl, [B.SCL_VEGETATION, B.SCL_NOT_VEGETATED, B.SCL_WATER])
    assert clear20.mean() > 0.3
    for band in B.S2_BANDS:
        ds = gdal.Open(str(scene_dir / f"synth0_0000_{band}.tif"))
        assert ds.GetRasterBand(1).DataType == gdal.GDT_UInt16
        dn = ds.ReadAsArray()
        f = B.S2_RESOLUTION_M[band] // 20
        clear = clear20[::f, ::f] if f >= 1 else clear20
        if B.S2_RESOLUTION_M[band] == 10:
            clear = np.repeat(np.repeat(clear20, 2, 0), 2, 1)
        lo, hi = B.S2_REFLECTANCE_RANGE[band]
        vals = dn[clear] / B.S2_QUANTIFICATION
        assert vals.min() > lo and np.quantile(vals, 0.999) < hi, band
    for pol in B.S1_BANDS:
        db = read(scene_dir / f"synth0_0000_{pol}.tif")
        assert db.dtype == np.float32
        lo, hi = B.S1_DB_RANGE[pol]
        assert lo < np.quantile(db, 0.001) and np.quantile(db, 0.999) < hi
    vv, vh = read(scene_dir / "synth0_0000_VV.tif"), read(scene_dir / "synth0_0000_VH.tif")
    assert vh.mean() < vv.mean() - 4  # cross-pol is much weaker
    label = read(scene_dir / "synth0_0000_label.tif")
    assert label.dtype == np.uint8 and label.max() < SMALL.classes


def test_classes_are_separable_and_regions_are_large():
    cfg = SynthConfig(size=600, size_spread=0.0, cloud_fraction=0.0, nodata_fraction=0.0,
                      classes=8, seed=0)
    s = render_scene(cfg, 0)
    present = [k for k in range(8) if (s.label == k).mean() > 0.01]
    assert len(present) >= 3
    opt = {k: np.array([s.s2[b][s.label == k].mean() for b in B.S2_10M]) for k in present}
    sar = {k: np.array([s.s1[p][s.label == k].mean() for p in B.S1_BANDS]) for k in present}
    for i in present:
        for j in present:
            if i < j:
                assert np.linalg.norm(opt[i] - opt[j]) > 200, (i, j)  # DN, i.e. 0.02 refl.
                assert np.linalg.norm(sar[i] - sar[j]) > 0.5, (i, j)  # dB
    # A 120 px patch is mostly one class.
    p = 120
    purity = [np.bincount(s.label[r:r + p, c:c + p].ravel()).max() / p / p
              for r in range(0, 600, p) for c in range(0, 600, p)]
    assert np.mean(purity) > 0.6


def test_clouds_shadows_nodata_agree_with_scl(messy_scene):
    s = messy_scene
    scl = s.scl
    # No-data: exactly the SCL-0 pixels are 0 in every band, at every resolution.
    for band, dn in s.s2.items():
        f = B.S2_RESOLUTION_M[band]
        if f == 10:
            nod = np.repeat(np.repeat(scl == 0, 2, 0), 2, 1)
        elif f == 20:
            nod = scl == 0
        else:
            nod = (scl == 0)[::3, ::3]
        assert np.array_equal(dn == 0, nod), band
    b02 = s.s2["B02"][::2, ::2].astype(float)
    clear = np.isin(scl, [B.SCL_VEGETATION, B.SCL_NOT_VEGETATED, B.SCL_WATER])
    thick = scl == B.SCL_CLOUD_HIGH
    assert thick.any() and (scl == B.SCL_CLOUD_SHADOW).any()
    assert np.median(b02[thick]) > 2 * np.median(b02[clear])
    nir = s.s2["B08"][::2, ::2].astype(float)
    label20 = s.label[::2, ::2]
    shadow = scl == B.SCL_CLOUD_SHADOW
    for k in np.unique(label20[shadow]):  # shadows darken the same class
        sel_s, sel_c = shadow & (label20 == k), clear & (label20 == k)
        if sel_s.sum() > 20 and sel_c.sum() > 20:
            assert nir[sel_s].mean() < 0.7 * nir[sel_c].mean()
    # SAR is not affected by clouds: the same class has the same mean under cloud and clear sky.
    vv = s.s1["VV"][::2, ::2]
    for k in np.unique(label20[thick]):
        a, b = thick & (label20 == k), clear & (label20 == k)
        if a.sum() > 200 and b.sum() > 200:
            assert abs(vv[a].mean() - vv[b].mean()) < 1.5


def test_sizes_vary_with_spread():
    rng = np.random.default_rng(0)
    wide = [draw_size(rng, 1200, 0.8) for _ in range(40)]
    sides = [max(h, w) for h, w in wide]
    assert max(sides) / min(sides) > 3
    assert all(h % 60 == 0 and w % 60 == 0 and min(h, w) >= 120 for h, w in wide)
    flat = {draw_size(rng, 600, 0.0)[0] for _ in range(10)}
    assert len(flat) <= 3  # only the mild aspect jitter remains


def test_per_resolution_layout(tmp_path):
    cfg = SynthConfig(scenes=1, size=180, size_spread=0.0, seed=2, layout="per-resolution")
    generate(tmp_path, cfg, command="test")
    n = "synth2_0000"
    ds = gdal.Open(str(tmp_path / n / f"{n}_R20m.tif"))
    names = [ds.GetRasterBand(i).GetDescription() for i in range(1, ds.RasterCount + 1)]
    assert names == list(B.S2_20M)
    scene = render_scene(cfg, 0)
    assert np.array_equal(ds.GetRasterBand(4).ReadAsArray(), scene.s2["B8A"])


def test_resume_and_parameter_conflict(tmp_path):
    cfg = SynthConfig(scenes=2, size=120, size_spread=0.0, seed=4, s1=False)
    generate(tmp_path, cfg, command="test")
    first = (tmp_path / "synth4_0001" / "synth4_0001_B02.tif").read_bytes()
    stale = tmp_path / ".synth4_0001.99999.tmp"
    stale.mkdir()
    (stale / "junk.tif").write_bytes(b"partial")
    import shutil

    shutil.rmtree(tmp_path / "synth4_0001")
    result = generate(tmp_path, cfg, command="test")
    assert result.reused == ["synth4_0000"]
    assert (tmp_path / "synth4_0001" / "synth4_0001_B02.tif").read_bytes() == first
    assert not stale.exists()
    with pytest.raises(UserError, match="other parameters"):
        generate(tmp_path, SynthConfig(scenes=2, size=120, seed=5, s1=False))
    generate(tmp_path, SynthConfig(scenes=1, size=120, seed=5, s1=False), force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["synth5_0000"]


def test_killed_scene_leaves_nothing(tmp_path, monkeypatch):
    real = synth.write_scene

    def dies_on_second(scene, folder, layout, compress):
        real(scene, folder, layout, compress)
        if scene.name.endswith("0001"):
            raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_scene", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, SynthConfig(scenes=3, size=120, size_spread=0.0), command="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth0_0000"]  # no manifest, no temp


def test_bad_options():
    for kw, opt in [({"classes": 9}, "--classes"), ({"size": 60}, "--size"),
                    ({"cloud_fraction": 1.5}, "--cloud-fraction"), ({"scenes": 0}, "--scenes")]:
        with pytest.raises(UserError, match=opt):
            SynthConfig(**kw).validate()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["synth", "--out", str(out), "--scenes", "1", "--size", "120",
                   "--size-spread", "0", "--no-s1", "--classes", "3", "--seed", "7"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("hpcsrl synth --out")
    assert manifest["classes"] == ["water", "forest", "cropland"] and manifest["s1_bands"] == []
    assert not list((out / "synth7_0000").glob("*_VV.tif"))
    rc = cli_main(["synth", "--out", str(out), "--classes", "12"])
    err = capsys.readouterr().err
    assert rc == 2 and "--classes" in err and "Traceback" not in err


def test_cli_help():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "hpcsrl.cli.main", "synth", "--help"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "--size-spread" in proc.stdout
