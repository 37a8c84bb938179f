"""Shards, exact statistics, the virtual master, validation, resume; the driver in-process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from geotiff_scenes import default_labels, scene_set, write_scene

from hpcsrl.data import PatchDataset
from hpcsrl.errors import UserError
from preprocess import writer
from preprocess.main import build_parser, run
from preprocess.tiling import Layout

P = 60


# --- pure parts ------------------------------------------------------------------------------

def test_band_stats_are_exact_and_independent_of_grouping():
    rng = np.random.default_rng(0)
    x = rng.normal(500, 80, (10, 3, 6, 6)).astype(np.float32)
    x[2, 1, 0, 0] = np.nan  # non-finite values are left out of sums and counts
    one, many = writer.BandStats(), writer.BandStats()
    one.add("d", x)
    for part in (x[:3], x[3:4], x[4:]):
        other = writer.BandStats()
        other.add("d", part)
        many.merge(other)
    assert one.data == many.data  # integers: bit-identical whatever the grouping
    mean, std = one.mean_std("d", 3)
    v = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean, np.nanmean(v, axis=1), rtol=1e-9)
    np.testing.assert_allclose(std, np.nanstd(v, axis=1), rtol=1e-7)
    assert one.data["d"]["count"] == [360, 359, 360]
    assert writer.BandStats().mean_std("absent", 2)[1].tolist() == [0.0, 0.0]
    u = rng.integers(0, 65535, (4, 2, 120, 120)).astype(np.uint16)
    ints, floats = writer.BandStats(), writer.BandStats()
    ints.add("u", u)  # exact integer path
    floats.add("u", u.astype(np.float32))  # float path on the same values
    assert ints.data == floats.data
    empty = writer.BandStats()
    empty.add("d", x[:0])  # a strip whose patches were all dropped
    assert empty.data == {}


def test_plan_pieces_global_order_merge_and_bad_scenes():
    # rank 0 has scene 0 [0,4) then scene 2; rank 1 has scene 0 [4,6) and scene 1
    ranges = [[(0, 0, 4), (2, 0, 3)], [(0, 4, 6), (1, 0, 5)]]
    kept = [[4, 2], [1, 5]]
    pieces = writer.plan_pieces(ranges, kept, bad_scenes=[])
    assert pieces == [writer.Piece(0, 0, 0, 4), writer.Piece(1, 0, 4, 6), writer.Piece(0, 4, 10, 2)]
    pieces = writer.plan_pieces(ranges, kept, bad_scenes=[1])
    assert pieces == [writer.Piece(0, 0, 0, 4), writer.Piece(1, 0, 4, 1), writer.Piece(0, 4, 5, 2)]


def write_shard(output: Path, rank: int, layout: Layout, values: list[int]) -> None:
    shard = writer.shard_path(output, rank)
    shard.parent.mkdir(parents=True, exist_ok=True)
    with writer.atomic_path(shard) as tmp:
        w = writer.ShardWriter(tmp, layout)
        for v in values:
            arrays = {name: np.full((1, *row), v, dtype) for name, (row, dtype) in
                      layout.datasets().items()}
            w.append(arrays)
        w.close()


def test_master_maps_shards_in_global_order_and_validates(tmp_path):
    layout = Layout(None, ("VV", "VH"), 6, 0)  # S1 only, no classes: smallest layout
    out = tmp_path / "m.h5"
    write_shard(out, 0, layout, [10, 11, 30])
    write_shard(out, 1, layout, [20])
    pieces = writer.plan_pieces([[(0, 0, 2), (2, 0, 1)], [(1, 0, 1)]], [[2, 1], [1]], [])
    n = writer.write_master(out, layout, pieces, [3, 1], {"format_version": 1})
    assert n == 4
    with h5py.File(out) as f:
        assert f["s1"].is_virtual and f["s1"][:, 0, 0, 0].tolist() == [10, 11, 20, 30]
        assert f["classes"].shape == (4, 0)
    assert not list(tmp_path.glob(".m.h5.*"))  # no temp left
    writer.shard_path(out, 1).unlink()
    with pytest.raises(UserError, match="rank-0001.h5 is missing"):
        writer.validate(out, layout, 4)


def test_truncated_shard_is_named_not_the_master(tmp_path):
    layout = Layout(None, ("VV", "VH"), 6, 0)
    out = tmp_path / "t.h5"
    write_shard(out, 0, layout, [10, 11])
    write_shard(out, 1, layout, [20])
    pieces = writer.plan_pieces([[(0, 0, 2)], [(1, 0, 1)]], [[2], [1]], [])
    writer.write_master(out, layout, pieces, [2, 1], {"format_version": 1,
                                                       "mean_s1": [0.0, 0.0],
                                                       "std_s1": [1.0, 1.0]})
    shard = writer.shard_path(out, 1)
    shard.write_bytes(shard.read_bytes()[:-500])  # e.g. a copy cut short
    expect = rf"^{shard}: this shard of {out} cannot be read, probably truncated"
    with pytest.raises(UserError, match=expect):
        writer.validate(out, layout, 3)
    with pytest.raises(UserError, match=expect):  # training on the file says the same
        PatchDataset(out, bands="s1")


def test_reusable_manifest_requires_same_fingerprint_and_complete_shard(tmp_path):
    layout = Layout(None, ("VV",), 6, 0)
    out = tmp_path / "r.h5"
    write_shard(out, 0, layout, [1, 2])
    writer.write_manifest(out, 0, {"fingerprint": "abc", "shard_rows": 2})
    assert writer.reusable_manifest(out, 0, "abc")["shard_rows"] == 2
    assert writer.reusable_manifest(out, 0, "other") is None
    writer.write_manifest(out, 0, {"fingerprint": "abc", "shard_rows": 3})
    assert writer.reusable_manifest(out, 0, "abc") is None
    writer.forget_shard(out, 0)
    assert writer.reusable_manifest(out, 0, "abc") is None
    # stale files: temps of killed runs and shards of ranks beyond the new rank count
    (writer.shard_dir(out) / ".rank-0000.h5.123.tmp").write_text("x")
    write_shard(out, 3, layout, [1])
    (tmp_path / ".r.h5.99.tmp").write_text("x")
    writer.clean_stale(out, 2)
    assert sorted(p.name for p in writer.shard_dir(out).iterdir()) == ["rank-0000.h5"]
    assert not (tmp_path / ".r.h5.99.tmp").exists()


# --- the driver in-process (a COMM_WORLD of one rank) ----------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    sizes = [(180, 120), (60, 60), (120, 180)]
    out = [write_scene(d, f"S{i}", w, h, seed=i, labels=default_labels(w, h))
           for i, (w, h) in enumerate(sizes)]
    return d, out


@pytest.fixture(autouse=True)
def fresh_logger():
    """hpcsrl.log binds its handler to the sys.stderr of the first call; pytest swaps stderr
    per test, so start each test with a new handler."""
    logging.getLogger("hpcsrl.preprocess").handlers.clear()


def drive(input_dir, output, sceneset, *extra):
    from mpi4py import MPI

    args = build_parser().parse_args(["--input", str(input_dir), "--output", str(output),
                                      "--patch-size", str(P), "--no-progress", *extra])
    return run(MPI.COMM_WORLD, args, discover=lambda *a, **k: sceneset)


def test_pipeline_writes_schema_and_resumes(scenes, tmp_path, capsys):
    d, sc = scenes
    out = tmp_path / "p.h5"
    assert drive(d, out, scene_set(sc)) == 0
    printed = capsys.readouterr().out
    assert "balance (max/mean patches per rank): 1.0000" in printed
    assert "wrote 13 patches" in printed
    with h5py.File(out) as f:
        assert f["data_super"].shape == (13, 12, P, P) and f["data_20m"].shape == (13, 6, 30, 30)
        assert f["scene"][:].tolist() == [0] * 6 + [1] + [2] * 6
        assert f["row"][:7].tolist() == [0, 0, 0, 60, 60, 60, 0]
        assert list(f.attrs["scene_names"]) == ["S0", "S1", "S2"]
        assert json.loads(f.attrs["assignment"]) == [[[0, 0, 6], [1, 0, 1], [2, 0, 6]]]
        assert f.attrs["mean_data_super"].shape == (12,) and f.attrs["balance"] == 1.0
        first = {k: f[k][:] for k in f}
        mean = f.attrs["mean_data_10m"]
    ds = PatchDataset(out, bands="s2-10m")
    raw = first["data_10m"].astype(np.float64)
    np.testing.assert_allclose(mean, raw.mean(axis=(0, 2, 3)), rtol=1e-9)
    assert len(ds) == 13 and ds.class_names == ("forest", "water", "crops")
    # a second run with --force reuses the complete shard and gives the same file
    assert drive(d, out, scene_set(sc), "--force") == 0
    assert "reused shard" in capsys.readouterr().out
    with h5py.File(out) as f:
        for k, v in first.items():
            np.testing.assert_array_equal(f[k][:], v)
    # another patch filter changes the fingerprint: no reuse
    assert drive(d, out, scene_set(sc), "--max-cloud", "0.5", "--force") == 0
    assert "reused shard" not in capsys.readouterr().out


def test_existing_output_is_refused_without_force(scenes, tmp_path, capsys):
    d, sc = scenes
    out = tmp_path / "e.h5"
    out.write_bytes(b"an earlier result")
    assert drive(d, out, scene_set(sc)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == [f"hpcsrl-preprocess: error: --output {out}: already exists; pass --force to "
                   "replace it"], captured.err
    assert out.read_bytes() == b"an earlier result"  # left untouched, no shard written
    assert not writer.shard_dir(out).exists()
    assert drive(d, out, scene_set(sc), "--force") == 0
    with h5py.File(out) as f:
        assert len(f["label"]) == 13


def test_exclusion_list_through_the_reader(scenes, tmp_path, capsys):
    from mpi4py import MPI

    d, _ = scenes
    lst = tmp_path / "patches_with_seasonal_snow.csv"
    lst.write_text("S1\nS2,extra\n")
    out = tmp_path / "x.h5"
    args = build_parser().parse_args(["--input", str(d), "--output", str(out), "--patch-size",
                                      str(P), "--no-progress", "--exclude", str(lst)])
    assert run(MPI.COMM_WORLD, args) == 0  # the real discover (synthetic layout)
    with h5py.File(out) as f:
        assert list(f.attrs["scene_names"]) == ["S0"] and len(f["label"]) == 6
        assert list(f.attrs["exclude"]) == [str(lst)]
    args.exclude, args.force = str(tmp_path / "nope.csv"), True
    assert run(MPI.COMM_WORLD, args) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_bad_scene_stops_with_one_message_or_is_skipped(tmp_path, capsys):
    d = tmp_path / "in"
    good = write_scene(d, "G", 120, 120, seed=1)
    bad = write_scene(d, "BAD", 120, 120, seed=2)
    path = Path(bad.s2["B11"].path)
    path.write_bytes(path.read_bytes()[:400])  # truncated GeoTIFF
    out = tmp_path / "b.h5"
    assert drive(d, out, scene_set([good, bad])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BAD_B11.tif" in err[0] and "Traceback" not in err[0]
    assert not out.exists()
    assert drive(d, out, scene_set([good, bad]), "--skip-bad") == 0
    printed = capsys.readouterr().out
    assert "skipped BAD" in printed
    with h5py.File(out) as f:
        assert f["scene"][:].tolist() == [0] * 4
        assert "BAD_B11.tif" in f.attrs["skipped"]


def test_option_errors_are_one_line(scenes, tmp_path, capsys):
    d, sc = scenes
    assert drive(d, tmp_path / "o.h5", scene_set(sc), "--max-cloud", "2") == 2
    assert "--max-cloud 2.0" in capsys.readouterr().err
    assert drive(tmp_path / "absent", tmp_path / "o.h5", scene_set(sc)) == 2
    assert "no such folder" in capsys.readouterr().err
    a_file = sc[0].s2["B02"].path
    assert drive(a_file, tmp_path / "o.h5", scene_set(sc)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--input {a_file}: is a file; give the folder" in err[0], err
    assert drive(d, tmp_path / "o.h5", scene_set(sc), "--patch-size", "64") == 2
    assert "multiple of 6" in capsys.readouterr().err
    assert drive(d, tmp_path / "o.h5", scene_set(sc), "--patch-size", "600") == 2
    assert "lower --patch-size" in capsys.readouterr().err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert drive(d, blocked / "sub" / "o.h5", scene_set(sc)) == 2
    assert "cannot create folder" in capsys.readouterr().err
    assert not any(tmp_path.glob("new/**/*.h5"))
    assert drive(d, tmp_path / "new" / "results" / "o.h5", scene_set(sc)) == 0  # made, like -p
    assert (tmp_path / "new" / "results" / "o.h5").is_file()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--assignment" in capsys.readouterr().out
