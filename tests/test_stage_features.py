"""Frozen features of several ResNet stages (hpcsrl.features.stages) and the protocol's
"freeze-stages" rows: the classic columns stay exact, the encoder stays frozen, and the stages
count is chosen on validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hpcsrl.errors import UserError
from hpcsrl.eval.protocol import EvalSpec, LabelledData, run_protocol
from hpcsrl.eval.report import read_csv
from hpcsrl.eval.train import FitConfig
from hpcsrl.features.stages import StagePooled, last_stage_columns
from hpcsrl.models.resnet import ResNet

torch.set_num_threads(1)
FAST = FitConfig(epochs=30, batch_size=32, progress=False)


def small_resnet(width: int = 8) -> ResNet:
    torch.manual_seed(0)
    return ResNet("resnet18", in_channels=3, stem="small", width=width).eval()


def test_stage_pooled_ends_with_the_encoders_own_features_and_leaves_no_hooks():
    enc = small_resnet()
    before = copy.deepcopy(enc.state_dict())
    x = torch.randn(4, 3, 16, 16)
    staged = StagePooled(enc, 3)
    with torch.no_grad():
        out, classic = staged(x), enc(x)
    assert staged.dims == [16, 32, 64]  # stages 2-4 of a width-8 trunk
    assert out.shape == (4, 112)
    assert torch.equal(out[:, last_stage_columns(staged.dims, 1)], classic)
    assert last_stage_columns(staged.dims, 2) == slice(16, 112)
    layer3_end = enc.layer3_1
    with torch.no_grad():
        pooled3 = nn.functional.adaptive_avg_pool2d(
            nn.Sequential(*list(enc.children())[:layer3_index(enc) + 1])(x), 1).flatten(1)
    assert torch.allclose(out[:, 16:48], pooled3)
    assert not layer3_end._forward_hooks and not any(m._forward_hooks for m in enc.modules())
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k


def layer3_index(enc: ResNet) -> int:
    return [n for n, _ in enc.named_children()].index("layer3_1")


def test_stage_pooled_refuses_what_it_cannot_do():
    with pytest.raises(UserError, match="has 4 stages"):
        StagePooled(small_resnet(), 5)
    with pytest.raises(UserError, match="need a ResNet trunk"):
        StagePooled(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 2)


def textured_images(n_per_class: int = 40, k: int = 3, p: int = 16, seed: int = 0):
    """Classes differ in colour and texture, so the earlier stages of a random trunk see them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    x = rng.normal(size=(len(labels), 3, p, p)).astype(np.float32) * 0.5
    for cls in range(k):
        x[labels == cls, cls] += 1.5
    perm = rng.permutation(len(labels))
    return x[perm], labels[perm]


def blind_last_stage(enc: ResNet) -> ResNet:
    """The last stage outputs a constant: its weights and its shortcut are zeroed, so only the
    earlier stages carry the classes (the classic probe must be at chance, not the staged one)."""
    with torch.no_grad():
        for name, module in enc.named_children():
            if name.startswith("layer4"):
                for p in module.parameters():
                    p.zero_()
    return enc


def test_freeze_stages_rows_choose_the_stages_on_validation_and_keep_the_classic_rows(tmp_path):
    x, y = textured_images()
    data = LabelledData(lambda i: x[np.asarray(i)], y, ["a", "b", "c"])
    enc = blind_last_stage(small_resnet())
    digest = copy.deepcopy(enc.state_dict())
    both = EvalSpec(modes=("freeze", "freeze-stages"), fractions=(0.5,), tsne=False,
                    knn_floor=False, probe_weight_decays=(0.0,), fit=FAST)
    rows = run_protocol(data, {"enc": enc}, both, tmp_path / "both")
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"freeze", "freeze-stages"}
    assert by_mode["freeze"]["val_oa"] < 0.5       # a constant last stage: chance
    assert by_mode["freeze-stages"]["val_oa"] > 0.8
    assert "last 1 stage" not in by_mode["freeze-stages"]["selected"]
    assert "stages" in by_mode["freeze-stages"]["selected"]
    assert by_mode["freeze-stages"]["candidates"] == 3
    sel = read_csv(tmp_path / "both" / "selection.csv")
    assert sorted(r["setting"] for r in sel if r["mode"] == "freeze-stages") == [
        "native, last 1 stage, wd 0, 30 ep", "native, last 2 stages, wd 0, 30 ep",
        "native, last 3 stages, wd 0, 30 ep"]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, digest[k]), k
    # The classic rows are the same whether or not the staged features were extracted with them.
    alone = run_protocol(data, {"enc": enc}, EvalSpec(modes=("freeze",), fractions=(0.5,),
                         tsne=False, knn_floor=False, probe_weight_decays=(0.0,), fit=FAST),
                         tmp_path / "alone")
    assert alone[0]["val_oa"] == by_mode["freeze"]["val_oa"]
    assert alone[0]["oa"] == by_mode["freeze"]["oa"]


def test_freeze_stages_with_fine_tune_fine_tunes_the_classic_encoder(tmp_path):
    x, y = textured_images(n_per_class=12)
    data = LabelledData(lambda i: x[np.asarray(i)], y, ["a", "b", "c"])
    spec = EvalSpec(modes=("freeze", "freeze-stages", "finetune"), fractions=(0.5,),
                    tsne=False, knn_floor=False, probe_stages=(1, 2),
                    fit=FitConfig(epochs=2, finetune_epochs=1, batch_size=16, progress=False))
    rows = run_protocol(data, {"enc": small_resnet()}, spec, tmp_path)
    assert [r["mode"] for r in rows] == ["freeze", "freeze-stages", "finetune"]
    assert rows[1]["candidates"] == 2


def test_cli_mode_lists():
    from hpcsrl.cli.evaluate import parse_modes

    assert parse_modes("both") == ("freeze", "finetune")
    assert parse_modes("freeze-stages,both") == ("freeze-stages", "freeze", "finetune")
    with pytest.raises(UserError, match="choose from freeze, freeze-stages, finetune"):
        parse_modes("freeze,linear")
