"""Test / validation / pool splits (hpcsrl.data.splits): disjoint, stable across runs and rank
counts, grouped by scene or spatial block, recorded in split.json, and never read by pre-training
(the reader is instrumented)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcsrl.data.splits import Layout, SplitSpec, load_split, make_split, resolve_split
from hpcsrl.errors import UserError

torch.set_num_threads(1)
GT = (600000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0)


def tiled_layout(n_scenes: int, side: int, p: int = 60, offsets: list | None = None,
                 seed: int = 0) -> Layout:
    """`n_scenes` scenes of side x side patches of p px; scene s at map offset offsets[s]
    (default: far apart); labels vary within scenes."""
    rng = np.random.default_rng(seed)
    rows, cols, scene = [], [], []
    for s in range(n_scenes):
        for i in range(side):
            for j in range(side):
                scene.append(s)
                rows.append(i * p)
                cols.append(j * p)
    offsets = offsets or [(s * 100_000.0, 0.0) for s in range(n_scenes)]
    gt = np.array([(GT[0] + dx, 10.0, 0.0, GT[3] + dy, 0.0, -10.0) for dx, dy in offsets])
    n = len(scene)
    return Layout(rng.integers(0, 3, n), None, np.array(scene), np.array(rows), np.array(cols),
                  p, gt, np.zeros(n_scenes, np.int64))


def assert_disjoint(split) -> None:
    parts = [split.test, split.val, split.pool, split.guard]
    for i, a in enumerate(parts):
        assert np.all(np.diff(a) > 0)  # sorted, unique
        for b in parts[i + 1:]:
            assert not np.intersect1d(a, b).size


# ------------------------------------------------------------------------------- chips
def test_chip_split_is_disjoint_stratified_nested_and_stable():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    labels = np.random.default_rng(3).permutation(labels)
    layout = Layout.from_arrays(labels)
    a, b = make_split(layout), make_split(layout)
    assert a.grouping == "chip"
    assert_disjoint(a)
    assert np.array_equal(np.sort(np.concatenate([a.test, a.val, a.pool])), np.arange(1000))
    for part, share in ((a.test, 0.2), (a.val, 0.1)):
        counts = np.bincount(labels[part], minlength=4)
        np.testing.assert_allclose(counts, share * np.array([400, 300, 200, 100]), atol=1)
    assert a.digest() == b.digest() and np.array_equal(a.test, b.test)
    assert make_split(layout, SplitSpec(seed=1)).digest() != a.digest()
    sets = a.labelled((0.1, 0.2, 0.5))
    assert set(sets[0.1]) <= set(sets[0.2]) <= set(sets[0.5]) <= set(a.pool)
    assert len(sets[0.1]) == pytest.approx(0.1 * len(a.pool), abs=4)


def test_multilabel_only_patches_are_split_and_unlabelled_ones_go_to_the_pool():
    labels = np.array([0, 1, -1, -1, -1] * 20)
    mh = np.zeros((100, 3), np.uint8)
    mh[labels >= 0, labels[labels >= 0]] = 1
    mh[2::5, [0, 2]] = 1  # patch 2, 7, ...: two classes, label -1
    split = make_split(Layout.from_arrays(labels, mh))      # patches 3, 4, ...: no label at all
    unlabelled = np.flatnonzero((labels < 0) & ~mh.any(axis=1))
    assert set(unlabelled) <= set(split.pool)
    assert set(np.arange(2, 100, 5)) & set(split.test)  # multi-label patches are scored too


# ------------------------------------------------------------------------------- grouped
def test_scene_split_keeps_every_scene_on_one_side():
    layout = tiled_layout(30, 4)
    split = make_split(layout)
    assert split.grouping == "scene" and split.groups == 30
    assert_disjoint(split)
    side = np.full(len(layout), -1)
    for k, part in enumerate((split.test, split.val, split.pool)):
        side[part] = k
    for s in range(30):
        assert len(set(side[layout.scene == s])) == 1, f"scene {s} is split"
    assert len(split.test) == pytest.approx(0.2 * len(layout), abs=16)


def test_two_dates_of_one_place_share_a_side():
    # scene 2k and 2k+1: the same place (same origin), other places far apart
    layout = tiled_layout(24, 3, offsets=[((s // 2) * 100_000.0, 0.0) for s in range(24)])
    split = make_split(layout)
    side = np.full(len(layout), -1)
    for k, part in enumerate((split.test, split.val, split.pool)):
        side[part] = k
    for s in range(0, 24, 2):
        both = (layout.scene == s) | (layout.scene == s + 1)
        assert len(set(side[both])) == 1


def test_block_split_leaves_no_pool_patch_next_to_a_test_patch():
    layout = tiled_layout(2, 16)  # two scenes: too few groups, blocks within them
    split = make_split(layout)
    assert split.grouping == "block" and split.groups >= 10
    assert_disjoint(split)
    assert len(split.guard) > 0 and len(split.test) and len(split.val) and len(split.pool)
    x = layout.geotransform[layout.scene, 0] + layout.col * 10.0
    y = layout.geotransform[layout.scene, 3] - layout.row * 10.0
    ext = 600.0
    for t in split.test:
        for part in (split.val, split.pool):
            near = (np.abs(x[part] - x[t]) <= ext) & (np.abs(y[part] - y[t]) <= ext) & \
                (layout.scene[part] == layout.scene[t])
            assert not near.any(), f"test patch {t} touches {part[near]}"
    for v in split.val:
        near = (np.abs(x[split.pool] - x[v]) <= ext) & (np.abs(y[split.pool] - y[v]) <= ext) \
            & (layout.scene[split.pool] == layout.scene[v])
        assert not near.any()


# ------------------------------------------------------------------------------- split.json
def test_split_json_round_trip_and_refusals(tmp_path):
    layout = tiled_layout(12, 3)
    path = tmp_path / "split.json"
    split = resolve_split(path, layout)
    again = resolve_split(path, layout)
    assert again.digest() == split.digest() and again.path == str(path.resolve())
    rec = json.loads(path.read_text())
    assert rec["counts"]["test"] == len(split.test) and set(rec["labelled"]) == {"0.1", "0.2",
                                                                                 "0.5"}
    other = tiled_layout(12, 3, seed=1)  # other labels: another file
    with pytest.raises(UserError, match="another patch file"):
        load_split(path, other)
    with pytest.raises(UserError, match="other options"):
        resolve_split(path, layout, {"seed": 5})
    assert resolve_split(path, layout, {"seed": 0, "test_fraction": None}).digest() == \
        split.digest()
    rec["test"] = rec["test"][1:]
    path.write_text(json.dumps(rec))
    with pytest.raises(UserError, match="digest"):
        load_split(path, layout)


def write_tiled_h5(path: Path, layout: Layout, p: int = 8, run_attrs: dict | None = None
                   ) -> None:
    """A patch file in the SCHEMA.md layout with rgb data, labels and patch positions."""
    n = len(layout)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, 3, p, p)).astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("rgb", data=x)
        f.create_dataset("label", data=layout.labels.astype(np.int16))
        f.create_dataset("classes", data=np.eye(3, dtype=np.uint8)[layout.labels])
        for k in ("scene", "row", "col"):
            f.create_dataset(k, data=getattr(layout, k).astype(np.int32))
        f.attrs["mean_rgb"] = x.mean(axis=(0, 2, 3)).astype(np.float64)
        f.attrs["std_rgb"] = x.std(axis=(0, 2, 3)).astype(np.float64)
        f.attrs["patch_size"] = layout.patch_size
        f.attrs["class_names"] = ["a", "b", "c"]
        f.attrs["scene_geotransform"] = layout.geotransform
        f.attrs["scene_crs"] = layout.crs
        for k, v in (run_attrs or {}).items():
            f.attrs[k] = v


def test_split_of_a_file_ignores_how_it_was_made(tmp_path):
    layout = tiled_layout(12, 3)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_tiled_h5(a, layout, run_attrs={"n_ranks": 1, "seconds": 3.0})
    write_tiled_h5(b, layout, run_attrs={"n_ranks": 2, "seconds": 1.7})
    la, lb = Layout.read(a), Layout.read(b)
    assert la.fingerprint() == lb.fingerprint()
    assert make_split(la).digest() == make_split(lb).digest()


@pytest.mark.mpi
def test_split_is_the_same_for_one_and_two_preprocessing_ranks(run_mpi, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from geotiff_scenes import default_labels, write_scene

    scenes = tmp_path / "scenes"
    for i, (w, h) in enumerate([(360, 240), (180, 120), (240, 360)]):
        write_scene(scenes, f"S{i}", w, h, seed=i, labels=default_labels(w, h))
    digests = []
    for n in (1, 2):
        out = tmp_path / f"np{n}.h5"
        run_mpi(n, [sys.executable, "-m", "preprocess.main", "--input", str(scenes), "--output",
                    str(out), "--patch-size", "60", "--no-progress"], timeout=240)
        digests.append(make_split(Layout.read(out)).digest())
    assert digests[0] == digests[1]


# ------------------------------------------------------------------------------- pre-training
@pytest.fixture
def read_log(monkeypatch):
    """Every file row any PatchDataset reads (read_batch and __getitem__)."""
    from hpcsrl.data.dataset import PatchDataset

    rows: list[int] = []
    read_batch, getitem = PatchDataset.read_batch, PatchDataset.__getitem__

    def logged_batch(self, indices):
        rows.extend(int(r) for r in self.indices[np.asarray(indices, np.int64).reshape(-1)])
        return read_batch(self, indices)

    def logged_item(self, i):
        rows.append(int(self.indices[i]))
        return getitem(self, i)

    monkeypatch.setattr(PatchDataset, "read_batch", logged_batch)
    monkeypatch.setattr(PatchDataset, "__getitem__", logged_item)
    return rows


def pretrain(data: Path, out: Path, *extra: str) -> None:
    from hpcsrl.cli.main import main

    assert main(["pretrain", "--data", str(data), "--bands", "rgb", "--epochs", "1",
                 "--batch-size", "8", "--input-size", "32", "--threads", "1", "--no-progress",
                 "--monitor-samples", "16", "--precise-bn", "16", "--out", str(out),
                 *extra]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", [False, True])
def test_pretraining_never_reads_a_test_or_validation_patch(tmp_path, read_log, in_memory):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_eval import write_rgb_h5

    data = tmp_path / "chips.h5"
    write_rgb_h5(data, n=60, p=32)
    pretrain(data, tmp_path / "run", *(["--in-memory"] if in_memory else []))
    split = load_split(tmp_path / "run" / "split.json", Layout.read(data))
    assert read_log, "the instrument saw no reads"
    assert set(read_log) <= set(split.pool)
    assert not set(read_log) & (set(split.test) | set(split.val))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["data"]["split"]["pretrain_on"] == "pool"
    assert ckpt["data"]["split"]["digest"] == split.digest()

    read_log.clear()  # the instrument does see test reads when they are asked for
    pretrain(data, tmp_path / "all", "--pretrain-on", "all", "--split",
             str(tmp_path / "run" / "split.json"))
    assert set(read_log) & set(split.test)
    ckpt = torch.load(tmp_path / "all" / "checkpoint.pt", weights_only=False)
    assert ckpt["data"]["split"]["pretrain_on"] == "all"


@pytest.mark.slow
def test_evaluate_reuses_the_checkpoints_split_and_refuses_another(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_eval import write_rgb_h5

    from hpcsrl.cli.main import main

    data = tmp_path / "chips.h5"
    write_rgb_h5(data, n=60, p=32)
    pretrain(data, tmp_path / "run")
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                 "--data", str(data), "--mode", "freeze", "--label-fractions", "0.5",
                 "--epochs", "2,3", "--weight-decay", "0,0.01", "--no-tsne", "--quiet",
                 "--no-random-floor", "--out", str(out)]) == 0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    parts = json.loads((out / "parts.json").read_text())
    assert parts["split"]["digest"] == split["digest"] and parts["test"] == split["test"]
    report = (out / "report.csv").read_text().splitlines()
    assert report[0].startswith("encoder,mode,fraction,oa,") and "val_oa" in report[0]
    assert "selected" in report[0] and len((out / "selection.csv").read_text().splitlines()) > 4
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                 "--data", str(data), "--mode", "freeze", "--split", str(tmp_path / "s1.json"),
                 "--split-seed", "1", "--no-tsne", "--quiet", "--out", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert code == 2 and "pre-trained on the pool of split" in err
