"""Backbones, method models and the unit contract: shapes, parameter counts, chain == forward,
sequential form == two passes, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from hpcsrl.errors import UserError
from hpcsrl.models.registry import METHODS, build_method, model_from_checkpoint, model_from_config
from hpcsrl.models.resnet import ResNet
from hpcsrl.models.units import run_units
from hpcsrl.train.checkpoint import write_checkpoint

SMALL = {"moco-v2": {"queue_size": 32}}


def _channels(method: str) -> int:
    return 14 if method == "dual-simclr" else 3


def _small(method: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(method, "resnet18", _channels(method), **SMALL.get(method, {}))


def _views(c: int, n: int = 2, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randn(n, c, size, size, generator=g)


@pytest.mark.parametrize("depth,params,dim", [("resnet18", 11_176_512, 512),
                                              ("resnet34", 21_284_672, 512),
                                              ("resnet50", 23_508_032, 2048)])
def test_resnet_params_and_features(depth, params, dim):
    net = ResNet(depth, 3)
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.feature_dim == dim
    assert [n for n, _ in net.units()][:3] == ["backbone.conv1", "backbone.bn1_relu",
                                                "backbone.maxpool"]


@pytest.mark.parametrize("bands", [1, 2, 12, 13])
def test_resnet_any_band_count(bands):
    net = ResNet("resnet18", bands).eval()
    assert net(torch.randn(2, bands, 32, 32)).shape == (2, 512)


def test_lite_srl_units_and_size():
    model = build_method("lite-srl")
    names = [n for n, _ in model.units()]
    assert len(names) == 28  # as many cut points as the paper's p1..p28 (Fig. 13a)
    assert names[:3] == ["backbone.conv1", "backbone.bn1_relu", "backbone.maxpool"]
    assert names[11:13] == ["backbone.avgpool", "projector.fc1"]
    assert [n for n in names if "cat" in n] == ["projector.cat1", "projector.cat2"]
    assert names[20:24] == ["projector.fc3", "projector.bn3", "stop_grad", "predictor.fc1"]
    assert names[-1] == "loss"
    n = model.n_parameters()
    assert abs(n - 12.82e6) <= 0.3e6, n
    # every parameter is reachable through exactly the units
    unit_params = {id(p) for _, u in model.units() for p in u.parameters()}
    assert unit_params == {id(p) for p in model.parameters()}


def test_projector_output_relu_is_selectable():
    """Default: BN output (embeddings of both signs); proj_out_relu=True: the paper's ReLU."""
    torch.manual_seed(0)
    default = build_method("lite-srl", in_channels=2)
    paper = build_method("lite-srl", in_channels=2, proj_out_relu=True)
    assert default.n_parameters() == paper.n_parameters()
    names = [n for n, _ in paper.units()]
    assert len(names) == 29 and names[22] == "projector.relu3"
    x = torch.randn(8, 2, 32, 32)
    assert (default.embedding(x) < 0).any()
    assert (paper.embedding(x) >= 0).all()
    # checkpoints written before the option existed had the ReLU: rebuilt the same way
    old = {k: v for k, v in paper.config.items() if k != "proj_out_relu"}
    assert model_from_config(old).config["proj_out_relu"] is True


# Paper Table 2 (ResNet-18) and what we count; see each baseline's module docstring.
TABLE2 = {"simsiam": (22.73e6, 0.01), "byol": (31.81e6 - 1_026_000, 0.01),
          "simclr": (13.57e6, 0.03), "moco-v2": (22.48e6, 0.03)}


@pytest.mark.parametrize("method", sorted(TABLE2))
def test_baseline_parameter_counts(method):
    target, rel = TABLE2[method]
    n = build_method(method).n_parameters()
    assert abs(n - target) <= rel * target, (method, n)


def test_lite_srl_much_smaller_than_simsiam():
    ratio = build_method("lite-srl").n_parameters() / build_method("simsiam").n_parameters()
    assert ratio <= 0.57


@pytest.mark.parametrize("method", sorted(METHODS))
def test_units_chain_equals_forward(method):
    """Loss and gradients of the unit chain equal model(x_a, x_b) (training mode, BN on)."""
    model = _small(method)
    twin = copy.deepcopy(model)
    x_a, x_b = _views(_channels(method))
    loss = model(x_a, x_b)
    loss.backward()
    h = twin.chain_input(x_a, x_b)
    for _, unit in twin.units():
        h = unit(h)
        items = h if isinstance(h, tuple) else (h,)
        assert all(isinstance(t, torch.Tensor) for t in items)  # what crosses a cut
    assert torch.allclose(loss, h, atol=1e-6), (loss.item(), h.item())
    h.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert model.encoder(x_a).shape == (2, model.encoder.feature_dim)


def test_sequential_form_equals_two_passes_in_eval_mode():
    model = _small("lite-srl").eval()
    twin = copy.deepcopy(model)
    x_a, x_b = _views(3, n=3)
    loss = run_units(model.units(), model.chain_input(x_a, x_b))
    loss.backward()
    e_a, e_b = twin.embedding(x_a), twin.embedding(x_b)
    p_a, p_b = twin.predictor(e_a), twin.predictor(e_b)
    cos = torch.nn.functional.cosine_similarity
    direct = -0.5 * cos(p_a, e_b.detach()).mean() - 0.5 * cos(p_b, e_a.detach()).mean()
    direct.backward()
    assert torch.allclose(loss, direct, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_stop_gradient_copy_carries_no_grad():
    model = _small("lite-srl")
    h = model.chain_input(*_views(3))
    names = [name for name, _ in model.units()]
    assert "stop_grad" in names
    for name, unit in model.units()[:-1]:
        h = unit(h)
        if name == "stop_grad":
            assert isinstance(h, tuple) and not h[1].requires_grad and h[0].requires_grad
            assert torch.equal(h[0], h[1])


@pytest.mark.parametrize("method", ["byol", "moco-v2"])
def test_after_step_moves_momentum_target(method):
    model = _small(method)
    target = model.target if method == "byol" else model.key
    before = [p.clone() for p in target.parameters()]
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model(*_views(3))
    model.after_step(progress=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    if method == "moco-v2":
        assert int(model.queue.ptr) == 4  # 2 views x 2 samples enqueued


def test_dual_simclr_takes_the_s1s2_tensor():
    model = _small("dual-simclr")
    x = torch.randn(2, 14, 32, 32)
    assert torch.equal(model(x), model(x, torch.zeros(1)))
    assert model.encoder.feature_dim == 1024
    with pytest.raises(UserError, match="s1s2"):
        build_method("dual-simclr", in_channels=3)


def test_registry_errors():
    with pytest.raises(UserError, match="lite-srl"):
        build_method("simsam")
    with pytest.raises(UserError, match="resnet50"):
        build_method("lite-srl", backbone="resnet101")
    with pytest.raises(UserError, match="pred_hidden"):
        build_method("lite-srl", queue_size=3)


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = _small("simsiam")
    path = tmp_path / "ok.pt"
    write_checkpoint(path, {"config": model.config, "model": model.state_dict()})
    loaded, ckpt = model_from_checkpoint(path, expect={"method": "simsiam"})
    assert ckpt["config"] == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert model_from_config(model.config).config == model.config

    with pytest.raises(UserError, match="expected 'lite-srl'"):
        model_from_checkpoint(path, expect={"method": "lite-srl"})
    other = tmp_path / "other.pt"  # weights of a 4-band model under a 3-band config
    write_checkpoint(other, {"config": model.config,
                             "model": build_method("simsiam", in_channels=4).state_dict()})
    with pytest.raises(UserError, match="different architecture"):
        model_from_checkpoint(other)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        model_from_checkpoint(bad)
    with pytest.raises(UserError, match="no such checkpoint"):
        model_from_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------- small stem
def test_small_stem_keeps_resolution_and_units():
    net = ResNet("resnet18", 3, stem="small").eval()
    names = [n for n, _ in net.units()]
    assert names[:3] == ["backbone.conv1", "backbone.bn1_relu", "backbone.layer1_0"]
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    h = torch.randn(1, 3, 64, 64)
    for _, unit in net.units()[:-1]:
        h = unit(h)
    assert h.shape[-2:] == (8, 8)  # 8x reduction (the ImageNet stem leaves 2x2)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    # 3x3 instead of 7x7 weights, nothing else changes
    assert sum(p.numel() for p in net.parameters()) == 11_176_512 - 64 * 3 * (49 - 9)
    with pytest.raises(UserError, match="small"):
        ResNet("resnet18", 3, stem="tiny")


def test_mid_stem_halves_once_without_max_pool():
    net = ResNet("resnet18", 3, stem="mid").eval()
    small = ResNet("resnet18", 3, stem="small")
    assert [n for n, _ in net.units()] == [n for n, _ in small.units()]
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (2, 2)
    h = torch.randn(1, 3, 64, 64)
    for _, unit in net.units()[:-1]:
        h = unit(h)
    assert h.shape[-2:] == (4, 4)  # 16x reduction: between small (8x8) and imagenet (2x2)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in small.parameters())
    model = build_method("lite-srl", stem="mid")
    assert model.config["stem"] == "mid" and model_from_config(model.config).config == model.config


def test_width_scales_every_stage_and_is_recorded():
    """--width w: stages of w, 2w, 4w, 8w channels (feature_dim 8w); recorded only when not 64
    and rebuilt from the config (the CLI test below loads a width-16 checkpoint)."""
    net = ResNet("resnet18", 3, stem="small", width=32).eval()
    assert net.feature_dim == 256 and net.width == 32
    assert [n for n, _ in net.units()] == [n for n, _ in ResNet("resnet18", 3,
                                                                 stem="small").units()]
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 256)
    # a BasicBlock's weights scale with width^2 (BN and the first conv linearly)
    full = sum(p.numel() for p in ResNet("resnet18", 3, stem="small").parameters())
    assert 0.24 * full < sum(p.numel() for p in net.parameters()) < 0.26 * full
    assert ResNet("resnet50", 3, width=16).feature_dim == 512
    model = build_method("lite-srl", stem="small", width=32)
    assert model.config["width"] == 32 and model.encoder.feature_dim == 256
    assert "width" not in build_method("lite-srl", stem="small").config
    assert model_from_config(model.config).config == model.config
    for bad in (0, 3, 1000, 2.5, True):
        with pytest.raises(UserError, match="width"):
            build_method("lite-srl", width=bad)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_small_stem_is_recorded_and_rebuilt_for_every_method(method):
    torch.manual_seed(0)
    model = build_method(method, "resnet18", _channels(method), stem="small",
                         **SMALL.get(method, {}))
    assert model.config["stem"] == "small"
    assert "stem" not in _small(method).config  # default configs stay as before
    stems = {m.stem for m in model.modules() if isinstance(m, ResNet)}
    assert stems == {"small"}  # momentum copies and the second Dual-SimCLR trunk too
    twin = model_from_config(model.config)
    assert twin.config == model.config
    assert len(twin.units()) == len(_small(method).units()) - (2 if method == "dual-simclr"
                                                               else 1)
    x_a, x_b = _views(_channels(method), n=2, size=16)
    model.eval()
    torch.testing.assert_close(run_units(model.units(), model.chain_input(x_a, x_b)),
                               model(x_a, x_b))


@pytest.mark.slow
def test_small_stem_profiles_plans_and_loads_in_evaluate(tmp_path, capsys):
    """`--stem small` through the CLIs: profile -> plan, and a small-stem checkpoint (and the
    random-init twin) loaded by `hpcsrl evaluate`."""
    import json
    import sys
    from pathlib import Path

    from hpcsrl.cli.main import main

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_eval import write_rgb_h5

    prof = tmp_path / "profile.json"
    assert main(["profile", "--method", "lite-srl", "--stem", "small", "--width", "16",
                 "--input-size", "16",
                 "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--out", str(prof)]) == 0
    p = json.loads(prof.read_text())
    assert "small" in json.dumps(p) and "width-16" in p["model"] and len(p["units"]) == 27
    assert main(["plan", "--profile", str(prof), "--devices", "3", "--memory", "2GiB",
                 "--bandwidth", "1Gbit/s", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["stages"]) == 3 and "small" in plan["model"]
    assert plan["model_options"] == {"stem": "small", "width": 16}  # what `hpcsrl dhp` builds

    data = tmp_path / "chips.h5"
    write_rgb_h5(data, n=30, p=16)
    torch.manual_seed(0)
    model = build_method("lite-srl", stem="small", width=16)
    write_checkpoint(tmp_path / "ckpt.pt", {"config": model.config, "model": model.state_dict(),
                                            "pretrain": {"bands": "rgb"}})
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(data),
                 "--mode", "freeze", "--label-fractions", "0.5", "--epochs", "2", "--no-tsne",
                 "--quiet", "--out", str(out)]) == 0
    rows = (out / "report.csv").read_text()
    assert "lite-srl" in rows and "random-init" in rows
    capsys.readouterr()
