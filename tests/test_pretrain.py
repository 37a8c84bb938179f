"""Pre-training: every method learns on a tiny dataset, --resume repeats an uninterrupted run bit
for bit, the collapse monitor warns, and `hpcsrl pretrain` runs end to end on a real HDF5."""

from __future__ import annotations

import csv
import logging

import h5py
import numpy as np
import pytest
import torch

from hpcsrl.augment import make_view_transform, two_views
from hpcsrl.augment.views import AUGMENT_PRESETS
from hpcsrl.cli import pretrain as pretrain_cli
from hpcsrl.cli.main import main
from hpcsrl.errors import UserError
from hpcsrl.features.precise_bn import clean_batches, recalibrate
from hpcsrl.models.registry import METHODS, build_method, model_from_checkpoint
from hpcsrl.models.resnet import BACKBONES, STEMS
from hpcsrl.train.loop import LOG_COLUMNS, MemoryPatches, PretrainConfig, Pretrainer


def _patterns(n, size=32, channels=3, seed=0):
    """Three classes of oriented stripes with class colours plus noise: learnable structure."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = np.empty((n, channels, size, size), np.float32)
    for i, k in enumerate(labels):
        angle = k * np.pi / 3 + rng.normal(0, 0.1)
        wave = np.sin(2 * np.pi * (3 + k) * (np.cos(angle) * xx + np.sin(angle) * yy)
                      + rng.uniform(0, 2 * np.pi))
        for c in range(channels):
            x[i, c] = wave * (1 + 0.3 * ((c + k) % 3)) + rng.normal(0, 0.3, (size, size))
    return x, labels.astype(np.int64)


class TensorPatches:
    """In-memory stand-in with the PatchDataset API the trainer uses."""

    def __init__(self, n=24, channels=3, sensor="optical", band_names=("R", "G", "B"), seed=0):
        self.x, self.labels = _patterns(n, channels=channels, seed=seed)
        self.channels, self.band_names, self.sensor = channels, tuple(band_names), sensor
        self.patch_size, self.has_labels = self.x.shape[-1], True
        self.class_names = ("a", "b", "c")

    def __len__(self):
        return len(self.x)

    def read_batch(self, idx):
        idx = np.asarray(idx)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.labels[idx])


def _method_input(method):
    if method == "dual-simclr":
        names = tuple(f"B{i:02d}" for i in range(12)) + ("VV", "VH")
        return TensorPatches(n=40, channels=14, sensor="s1s2", band_names=names)
    return TensorPatches(n=40)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_loss_falls(method):
    """25 SGD steps cycling over 5 fixed batches of view pairs: the loss must drop.

    Step 0 is left out of the baseline: MoCo's first queue holds random keys (an easy loss)."""
    torch.manual_seed(0)
    ds = _method_input(method)
    # MoCo: a queue of exactly one step's keys holds only the previous batch (true negatives).
    opts = {"queue_size": 16} if method == "moco-v2" else {}
    model = build_method(method, in_channels=ds.channels, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x = ds.read_batch(np.arange(len(ds)))[0]
    if method == "dual-simclr":
        x_a = x_b = x
    else:
        x_a, x_b = two_views(make_view_transform(ds.sensor, ds.band_names, 32), x,
                             torch.Generator().manual_seed(0))
    losses = []
    for step in range(25):
        b = slice(8 * (step % 5), 8 * (step % 5) + 8)
        loss = model(x_a[b], x_b[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(progress=step / 25)
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[1:6]) - 0.03, losses


def _cfg(**kw):
    base = dict(method="lite-srl", bands="rgb", epochs=2, batch_size=8, input_size=32,
                monitor_samples=8, progress=False, lr=0.05)
    base.update(kw)
    return PretrainConfig(**base)


def _same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


@pytest.mark.parametrize("method", ["lite-srl", pytest.param("moco-v2", marks=pytest.mark.slow)])
def test_resume_reproduces_uninterrupted_run(tmp_path, method):
    opts = {"queue_size": 32} if method == "moco-v2" else {}
    ds = TensorPatches(n=24)
    full = Pretrainer(ds, _cfg(method=method, method_options=opts), tmp_path / "full")
    rows_full = full.run()
    part = Pretrainer(ds, _cfg(method=method, method_options=opts), tmp_path / "part")
    assert len(part.run(stop_after=1)) == 1
    resumed = Pretrainer(ds, _cfg(method=method, method_options=opts), tmp_path / "part",
                         resume=True)
    assert resumed.start_epoch == 1
    rows_resumed = resumed.run()
    keys = ("epoch", "loss", "lr", "emb_std", "knn_acc")
    assert [[r[k] for k in keys] for r in rows_full] == [[r[k] for k in keys]
                                                         for r in rows_resumed]
    assert _same_state(full.model, resumed.model)
    with open(tmp_path / "part" / "log.csv") as f:
        logged = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in logged] == [r["loss"] for r in rows_full]
    assert tuple(logged[0]) == LOG_COLUMNS


def test_loader_workers_do_not_change_the_run(tmp_path):
    ds = TensorPatches(n=24)
    a = Pretrainer(ds, _cfg(epochs=1), tmp_path / "a").run()
    b = Pretrainer(ds, _cfg(epochs=1, workers=1), tmp_path / "b").run()
    assert a[0]["loss"] == b[0]["loss"]


def test_in_memory_patches_do_not_change_the_run(tmp_path):
    ds = TensorPatches(n=24)
    a = Pretrainer(ds, _cfg(epochs=1), tmp_path / "a")
    b = Pretrainer(ds, _cfg(epochs=1, in_memory=True), tmp_path / "b")
    assert isinstance(b.ds, MemoryPatches) and b.ds.channels == 3 and len(b.ds) == 24
    assert a.run()[0]["loss"] == b.run()[0]["loss"]
    assert _same_state(a.model, b.model)


def test_collapse_warning(tmp_path):
    trainer = Pretrainer(TensorPatches(n=24), _cfg(), tmp_path)
    trainer.model.embedding = lambda x: torch.ones(x.shape[0], 16)  # everything on one point
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer.log.addHandler(handler)
    try:
        std, acc = trainer.monitor()
    finally:
        trainer.log.removeHandler(handler)
    assert std == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= acc <= 1.0
    assert any("collapsing" in r.getMessage() for r in records)


def _write_rgb_h5(path, n=40, size=32, seed=0):
    """`_patterns` as a labelled uint8 RGB patch file (the SCHEMA.md layout)."""
    x, labels = _patterns(n, size=size, seed=seed)
    rgb = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["patch_size"] = size
        f.attrs["class_names"] = ["a", "b", "c"]
        f["rgb"] = rgb
        f.attrs["mean_rgb"] = rgb.astype(np.float64).mean(axis=(0, 2, 3))
        f.attrs["std_rgb"] = rgb.astype(np.float64).std(axis=(0, 2, 3))
        f["label"] = labels.astype(np.int16)
        f["classes"] = np.eye(3, dtype=np.uint8)[labels]
    return path


def test_cli_end_to_end(tmp_path, capsys):
    data = _write_rgb_h5(tmp_path / "demo.h5")
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--bands", "rgb", "--epochs", "1", "--batch-size",
            "8", "--input-size", "32", "--out", str(out), "--threads", "1", "--no-progress",
            "--monitor-samples", "16"]
    assert main(args) == 0
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"]
    assert all(0.0 <= float(r["knn_acc"]) <= 1.0 and float(r["images_per_s"]) > 0 for r in rows)
    model, ckpt = model_from_checkpoint(out / "checkpoint.pt", expect={"in_channels": 3})
    assert ckpt["epoch"] == 1 and model.config["method"] == "lite-srl"
    capsys.readouterr()

    assert main(args) == 2  # refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already complete
    assert main([*args, "--epochs", "2", "--resume"]) == 2  # later --epochs wins
    assert "different options" in capsys.readouterr().err


def _write_s1s2_h5(path, n=16, size=32):
    """Sentinel-2 (data_super, 12 bands) + Sentinel-1 (s1, dB) patches, no labels."""
    x, _ = _patterns(n, size=size, channels=14)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["patch_size"] = size
        f["data_super"] = (x[:, :12] * 300 + 1500).astype(np.float32)
        f["s1"] = (x[:, 12:] * 3 - 12).astype(np.float32)
        for name in ("data_super", "s1"):
            arr = f[name][:].astype(np.float64)
            f.attrs[f"mean_{name}"] = arr.mean(axis=(0, 2, 3))
            f.attrs[f"std_{name}"] = arr.std(axis=(0, 2, 3))
        f["label"] = np.full(n, -1, np.int16)
    return path


@pytest.mark.parametrize("bands,method", [
    ("s1s2", "dual-simclr"),
    pytest.param("s1", "lite-srl", marks=pytest.mark.slow),
    pytest.param("s1s2", "byol", marks=pytest.mark.slow)])
def test_cli_sar_and_paired_modalities(tmp_path, bands, method):
    data = _write_s1s2_h5(tmp_path / "s1s2.h5")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--bands", bands, "--method", method,
                 "--epochs", "1", "--batch-size", "8", "--input-size", "32", "--out", str(out),
                 "--threads", "1", "--no-progress", "--monitor-samples", "8"]) == 0
    with open(out / "log.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["knn_acc"] == ""  # no labels: no k-NN monitor, still a collapse monitor
    assert float(row["emb_std"]) > 0
    model, ckpt = model_from_checkpoint(out / "checkpoint.pt")
    assert ckpt["sensor"] == ("sar" if bands == "s1" else "s1s2")
    assert model.config["in_channels"] == (2 if bands == "s1" else 14)


def test_cli_names_match_the_registry():
    assert set(pretrain_cli.METHOD_NAMES) == set(METHODS)
    assert set(pretrain_cli.BACKBONE_NAMES) == set(BACKBONES)
    assert set(pretrain_cli.AUGMENT_NAMES) == set(AUGMENT_PRESETS)
    assert pretrain_cli.STEM_NAMES == STEMS


def test_method_options_are_typed_and_checked():
    parse = pretrain_cli.parse_method_options
    assert parse("lite-srl", ["proj_out_relu=1", "pred-hidden=64"]) == {
        "proj_out_relu": True, "pred_hidden": 64}
    assert parse("lite-srl", ["proj_out_relu=false"]) == {"proj_out_relu": False}
    for bad in (["proj_out_relu=maybe"], ["pred_hidden=wide"], ["temperature=0.1"], ["x"]):
        with pytest.raises(UserError, match="--method-option"):
            parse("lite-srl", bad)
    assert parse("simclr", ["temperature=0.2"]) == {"temperature": 0.2}


def test_cli_paper_literal_variant(tmp_path):
    data = _write_rgb_h5(tmp_path / "demo.h5", n=16)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--input-size", "32", "--out", str(out), "--threads", "1", "--no-progress",
                 "--monitor-samples", "8", "--augment", "paper",
                 "--method-option", "proj_out_relu=1"]) == 0
    model, ckpt = model_from_checkpoint(out / "checkpoint.pt")
    assert model.config["proj_out_relu"] is True and ckpt["pretrain"]["augment"] == "paper"
    assert "projector.relu3" in [n for n, _ in model.units()]


@pytest.mark.parametrize("bad,match", [(["--method", "simsam"], "lite-srl"),
                                       (["--bands", "s1"], "band set"),
                                       (["--method", "dual-simclr"], "s1s2")])
def test_cli_bad_input_is_one_line(tmp_path, capsys, bad, match):
    data = _write_rgb_h5(tmp_path / "demo.h5", n=8)
    rc = main(["pretrain", "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1",
               "--threads", "1", *bad])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and match in err and len(err.splitlines()) == 1


def test_precise_bn_is_the_exact_average_and_leaves_other_layers():
    torch.manual_seed(0)
    used, unused = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(4)
    model = torch.nn.ModuleDict({"used": used, "unused": unused}).eval()
    unused.running_mean.fill_(5.0)
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(3)]
    assert recalibrate(used, model, batches) == 12
    want = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(used.running_mean, want, atol=1e-6)
    assert used.momentum == 0.1 and not model.training
    assert torch.all(unused.running_mean == 5.0)


def test_precise_bn_batches_are_class_mixed_on_a_class_ordered_file():
    """A file stored class by class (EuroSAT): statistics from consecutive indices would hold one
    class per batch and a variance ~100x too small; clean_batches draws random batches, so the
    running variance is the population's (~1.01 here)."""
    labels = np.repeat([0, 1], 128)
    x = torch.from_numpy(np.where(labels == 0, -1.0, 1.0)).float()[:, None, None, None]
    x = x + 0.1 * torch.randn(len(x), 1, 2, 2, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.BatchNorm2d(1)
    recalibrate(bn, bn, clean_batches(lambda i: x[torch.from_numpy(i)], np.arange(len(x)), 32))
    assert 0.9 < float(bn.running_var) < 1.1
    sorted_bn = torch.nn.BatchNorm2d(1)
    recalibrate(sorted_bn, sorted_bn, (x[s:s + 32] for s in range(0, len(x), 32)))
    assert float(sorted_bn.running_var) < 0.05  # what the old sorted chunks measured


# ------------------------------------------------------------------ hardening (issue 12)
def test_progress_in_a_log_file_is_not_a_line_per_iteration(tmp_path, capsys):
    """Not a terminal (Slurm .out, CI): at most a start and an end line per epoch for a short run,
    however many iterations (the loss postfix used to force a line per iteration)."""
    ds = TensorPatches(n=64)
    Pretrainer(ds, _cfg(progress=True, batch_size=2, epochs=2), tmp_path / "r").run()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "/30 [" in ln]
    assert 2 <= len(lines) <= 4, lines


def test_monitor_samples_zero_trains_without_monitor(tmp_path):
    rows = Pretrainer(TensorPatches(n=16), _cfg(monitor_samples=0, epochs=1),
                      tmp_path / "r").run()
    assert len(rows) == 1 and np.isnan(rows[0]["emb_std"]) and np.isnan(rows[0]["knn_acc"])


def test_cli_monitor_samples_zero(tmp_path):
    data = _write_rgb_h5(tmp_path / "d.h5", n=16)
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--input-size", "32", "--out", str(tmp_path / "o"), "--threads", "1",
                 "--no-progress", "--monitor-samples", "0"]) == 0


def test_resume_refuses_another_data_file(tmp_path, capsys):
    a = _write_rgb_h5(tmp_path / "a.h5", n=16)
    b = _write_rgb_h5(tmp_path / "b.h5", n=24)
    args = ["pretrain", "--epochs", "1", "--batch-size", "8", "--input-size", "32",
            "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress",
            "--monitor-samples", "8"]
    assert main([*args, "--data", str(a)]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--data", str(b)]) == 2  # the run's split is a's
    assert "split.json was drawn for another patch file" in capsys.readouterr().err
    # even with a split of b, the checkpoint's data fingerprint refuses b
    assert main([*args, "--resume", "--data", str(b), "--split", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "b.h5" in err and "patches" in err, err
    assert main([*args, "--resume", "--data", str(a)]) == 0


def test_second_run_on_a_locked_folder_refuses_naming_the_holder(tmp_path):
    import os
    import socket

    out = tmp_path / "o"
    out.mkdir()
    (out / ".hpcsrl.lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # alive
    with pytest.raises(UserError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                        rf"PID {os.getppid()}\)"):
        Pretrainer(TensorPatches(n=16), _cfg(epochs=1), out)
    assert (out / ".hpcsrl.lock").exists()  # the holder keeps its lock


def test_stale_lock_and_temporary_checkpoint_of_a_killed_run_are_cleared(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "o"
    out.mkdir()
    (out / ".hpcsrl.lock").write_text(f"{socket.gethostname()} {dead}\n")
    stale = out / f".checkpoint.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    Pretrainer(TensorPatches(n=16), _cfg(epochs=1), out).run()
    assert not stale.exists() and not (out / ".hpcsrl.lock").exists()
    assert (out / "checkpoint.pt").exists()


def test_lock_of_a_killed_but_unreaped_process_is_taken_over(tmp_path):
    """Ranks of a SIGKILLed mpirun are re-parented to PID 1, which may reap them only seconds
    later: a zombie holder has ended, the resumed run must not be refused."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from hpcsrl.procs import ended_on_this_host

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while not ended_on_this_host(socket.gethostname(), child.pid):  # exited, not yet waited
            assert time.time() < deadline
            time.sleep(0.05)
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z"
        out = tmp_path / "o"
        out.mkdir()
        (out / ".hpcsrl.lock").write_text(f"{socket.gethostname()} {child.pid}\n")
        Pretrainer(TensorPatches(n=16), _cfg(epochs=1), out).run()
        assert (out / "checkpoint.pt").exists() and not (out / ".hpcsrl.lock").exists()
    finally:
        child.wait()
    assert not ended_on_this_host("another-host", child.pid)  # cannot see other hosts


def test_two_processes_on_one_folder_second_refuses(tmp_path):
    """A real second process while the first trains (the lock file holds its PID)."""
    import subprocess
    import sys
    import time

    data = _write_rgb_h5(tmp_path / "d.h5", n=64)
    args = [sys.executable, "-m", "hpcsrl.cli.main", "pretrain", "--data", str(data),
            "--batch-size", "8", "--input-size", "32", "--out", str(tmp_path / "o"),
            "--threads", "1", "--no-progress", "--monitor-samples", "8"]
    first = subprocess.Popen([*args, "--epochs", "50"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "o" / ".hpcsrl.lock").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run([*args, "--epochs", "50", "--resume"], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"PID {first.pid}" in errors[0], second.stderr
    finally:
        first.kill()
        first.wait()


def test_batch_larger_than_the_data_is_refused_with_the_patch_count(tmp_path):
    with pytest.raises(UserError, match="larger than the 16 training patches"):
        Pretrainer(TensorPatches(n=20), _cfg(batch_size=32, monitor_samples=8), tmp_path / "o")
    assert not (tmp_path / "o" / ".hpcsrl.lock").exists()


def test_refused_second_run_does_not_touch_the_split(tmp_path, capsys):
    import os
    import socket

    data = _write_rgb_h5(tmp_path / "d.h5", n=16)
    out = tmp_path / "o"
    out.mkdir()
    (out / ".hpcsrl.lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--input-size", "32", "--out", str(out), "--threads", "1", "--no-progress"]) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not (out / "split.json").exists() and (out / ".hpcsrl.lock").exists()
