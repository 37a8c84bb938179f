"""bf16 autocast: losses stay fp32, weights and checkpoints stay fp32, resume refuses another
precision, features come back float32 and close to fp32's. The bf16 runs skip on CPUs without
native bfloat16 (where `--precision bf16` is refused, which is tested everywhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcsrl.cli import pretrain as pretrain_cli
from hpcsrl.cli.main import main
from hpcsrl.errors import UserError
from hpcsrl.features.extract import extract
from hpcsrl.losses.cosine import lite_srl_loss
from hpcsrl.losses.ntxent import nt_xent
from hpcsrl.models.resnet import ResNet
from hpcsrl.precision import PRECISIONS, autocast, check_precision, native_bf16
from hpcsrl.train.loop import Pretrainer
from tests.test_pretrain import TensorPatches, _cfg, _write_rgb_h5

needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="CPU without native bfloat16")


def test_cli_names_match():
    assert pretrain_cli.PRECISION_NAMES == PRECISIONS


def test_unknown_precision_is_refused():
    with pytest.raises(UserError, match="fp32, bf16"):
        check_precision("fp16")


def test_bf16_refused_without_native_support(monkeypatch):
    monkeypatch.setattr("hpcsrl.precision.native_bf16", lambda: False)
    with pytest.raises(UserError, match="--precision fp32"):
        check_precision("bf16")
    assert check_precision("fp32") == "fp32"


def test_losses_run_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_in = lite_srl_loss(p.bfloat16(), p.bfloat16(), e.bfloat16(), e.bfloat16())
        nt = nt_xent(p, e)
    assert low_in.dtype == torch.float32 and nt.dtype == torch.float32
    # inputs rounded to bf16, the loss itself exact in fp32
    ref = lite_srl_loss(p.bfloat16().float(), p.bfloat16().float(), e.bfloat16().float(),
                        e.bfloat16().float())
    assert torch.equal(low_in, ref)
    assert torch.allclose(nt, nt_xent(p, e))


@needs_bf16
def test_bf16_pretraining_keeps_fp32_state_and_resume_checks_precision(tmp_path):
    ds = TensorPatches(n=24)
    run = Pretrainer(ds, _cfg(epochs=1, precision="bf16"), tmp_path / "bf16")
    rows = run.run()
    assert np.isfinite(rows[0]["loss"]) and rows[0]["emb_std"] > 0
    assert all(t.dtype == torch.float32 for t in run.model.state_dict().values()
               if t.is_floating_point())
    fp32 = Pretrainer(ds, _cfg(epochs=1), tmp_path / "fp32").run()
    assert rows[0]["loss"] != fp32[0]["loss"]  # really ran in bf16
    assert abs(rows[0]["loss"] - fp32[0]["loss"]) < 0.05
    with pytest.raises(UserError, match="--precision 'bf16' \\(now 'fp32'\\)"):
        Pretrainer(ds, _cfg(epochs=1), tmp_path / "bf16", resume=True)


def test_checkpoints_without_precision_resume_as_fp32(tmp_path):
    ds = TensorPatches(n=24)
    Pretrainer(ds, _cfg(epochs=2), tmp_path / "old").run(stop_after=1)
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=False)
    del ckpt["pretrain"]["precision"]  # as written before the option existed
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    assert Pretrainer(ds, _cfg(epochs=2), tmp_path / "old", resume=True).start_epoch == 1


@needs_bf16
def test_bf16_features_are_float32_and_close():
    torch.manual_seed(0)
    enc = ResNet("resnet18", 3, stem="small").eval()
    x = torch.randn(6, 3, 32, 32)
    idx = np.arange(6)
    full = extract({"e": enc}, lambda i: x[i], idx, with_stats=False, progress=False)["e"]
    low = extract({"e": enc}, lambda i: x[i], idx, with_stats=False, progress=False,
                  precision="bf16")["e"]
    assert low.dtype == np.float32
    rel = np.linalg.norm(low - full) / np.linalg.norm(full)
    assert 0 < rel < 0.05, rel


@needs_bf16
def test_cli_pretrain_and_evaluate_in_bf16(tmp_path):
    data = _write_rgb_h5(tmp_path / "d.h5", n=60)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--input-size", "32", "--out", str(out), "--threads", "1", "--no-progress",
                 "--monitor-samples", "8", "--precision", "bf16"]) == 0
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(data),
                 "--mode", "freeze", "--label-fractions", "0.5", "--epochs", "5", "--no-tsne",
                 "--quiet", "--precision", "bf16", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "report.csv").exists()


def test_autocast_fp32_changes_nothing():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("fp32"):
        assert torch.equal(lin(x), lin(x)) and lin(x).dtype == torch.float32


@needs_bf16
def test_multilabel_training_in_bf16(tmp_path):
    from tests.test_train_cli import _args

    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    assert main([*_args(data, tmp_path / "run"), "--precision", "bf16"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["train"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())
