"""`hpcsrl train`: multi-label classification end to end on a real HDF5, exact --resume, --init
from a pre-training checkpoint, and one clear line for a file without `classes`."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from test_pretrain import TensorPatches, _write_rgb_h5

from hpcsrl.cli.main import main
from hpcsrl.data import PatchDataset
from hpcsrl.data.splits import Layout, resolve_split
from hpcsrl.schedules import WarmupDecay
from hpcsrl.train.classify import ClassifyConfig, ClassTrainer, mixup
from hpcsrl.train.loop import PretrainConfig, Pretrainer


def _args(data, out, *more):
    return ["train", "--data", str(data), "--bands", "rgb", "--backbone", "resnet18",
            "--epochs", "2", "--batch-size", "8", "--out", str(out), "--threads", "1",
            "--no-progress", *more]


def test_cli_end_to_end(tmp_path):
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    assert main(_args(data, tmp_path / "run")) == 0
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["val_f1_micro"]) <= 1 for r in rows)
    with open(tmp_path / "run" / "test_f1.csv") as f:
        report = {r["class"]: r for r in csv.DictReader(f)}
    assert set(report) == {"a", "b", "c", "micro", "macro"}
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["task"] == "multilabel" and ckpt["config"]["n_classes"] == 3
    assert ckpt["train"]["nesterov"] is True and ckpt["train"]["decay_epochs"] == [1]


def _trainer(data, out, **kw):
    ds = PatchDataset(data, bands="rgb")
    split = resolve_split(out.parent / f"{out.name}-split.json", Layout.read(data))
    cfg = ClassifyConfig(backbone="resnet18", bands="rgb", epochs=2, batch_size=8,
                         progress=False, warmup_epochs=1, **kw)
    return ClassTrainer(ds, split, cfg, out, resume=out.exists())


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    full = _trainer(data, tmp_path / "full")
    rows = full.run()
    part = _trainer(data, tmp_path / "part")
    part.run(stop_after=1)
    resumed = _trainer(data, tmp_path / "part")
    assert resumed.start_epoch == 1
    assert [r["loss"] for r in resumed.run()] == [r["loss"] for r in rows]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert isinstance(full.sched.lr_lambdas[0], WarmupDecay)


def test_init_loads_the_pretrained_backbone(tmp_path):
    pre = Pretrainer(TensorPatches(n=24), PretrainConfig(bands="rgb", epochs=1, batch_size=8,
                                                         input_size=32, monitor_samples=0,
                                                         progress=False, precise_bn=0),
                     tmp_path / "pre")
    pre.run()
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    ds = PatchDataset(data, bands="rgb")
    split = resolve_split(tmp_path / "split.json", Layout.read(data))
    cfg = ClassifyConfig(backbone="resnet18", bands="rgb", epochs=1, batch_size=8,
                         progress=False)
    trainer = ClassTrainer(ds, split, cfg, tmp_path / "cls",
                           init=str(tmp_path / "pre" / "checkpoint.pt"))
    want = pre.model.backbone.state_dict()
    for name, t in trainer.model.backbone.state_dict().items():
        assert torch.equal(t, want[name]), name
    trainer.lock.release()
    with pytest.raises(Exception, match="--init needs --backbone resnet18"):
        ClassTrainer(ds, split, ClassifyConfig(backbone="resnet34", bands="rgb", epochs=1,
                                               batch_size=8, progress=False),
                     tmp_path / "cls2", init=str(tmp_path / "pre" / "checkpoint.pt"))


def test_file_without_classes_is_one_line(tmp_path, capsys):
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    with h5py.File(data, "a") as f:
        del f["classes"]
    assert main(_args(data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no `classes` dataset" in err[0] and str(data) in err[0]


def test_mixup_mixes_inputs_and_targets_alike():
    x = torch.arange(4.0).view(4, 1, 1, 1)
    y = torch.eye(4)
    xm, ym = mixup(x, y, 0.4, np.random.default_rng(0))
    assert torch.allclose(xm.view(-1), ym @ torch.arange(4.0))
    assert torch.allclose(ym.sum(1), torch.ones(4))
