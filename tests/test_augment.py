"""Batched augmentations: shapes, determinism, the per-sensor pipelines, no colour ops on SAR."""

from __future__ import annotations

import pytest
import torch

from hpcsrl.augment import make_view_transform, two_views
from hpcsrl.augment.common import gaussian_blur, random_geometry
from hpcsrl.augment.sar import speckle
from hpcsrl.augment.views import AUGMENT_PRESETS
from hpcsrl.errors import UserError

S2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
CASES = {"rgb": ("optical", ("R", "G", "B")), "s2": ("optical", S2),
         "sar": ("sar", ("VV", "VH")), "s1s2": ("s1s2", (*S2, "VV", "VH"))}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(c, n=6, size=40, seed=3):
    return torch.randn(n, c, size, size, generator=_gen(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_shape_and_determinism(case):
    sensor, names = CASES[case]
    t = make_view_transform(sensor, names, 32, std=[4.0] * len(names))
    x = _batch(len(names))
    a, b = two_views(t, x, _gen(5))
    a2, b2 = two_views(t, x, _gen(5))
    assert a.shape == b.shape == (6, len(names), 32, 32)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)
    assert not torch.equal(a, two_views(t, x, _gen(6))[0])
    assert torch.isfinite(a).all()


def test_pipeline_depends_on_sensor():
    rgb = make_view_transform("optical", ("R", "G", "B"), 32).steps()
    ms = make_view_transform("optical", S2, 32).steps()
    sar = make_view_transform("sar", ("VV", "VH"), 32).steps()
    assert "colour_jitter" in rgb and "random_grayscale" in rgb
    assert "colour_jitter" not in ms and "band_jitter" in ms
    assert {"speckle", "db_gain"} <= set(sar)
    assert not {"colour_jitter", "random_grayscale", "band_jitter"} & set(sar)


def _mixes_channels(sensor, names):
    """Does output channel 1 change when only input channel 0 changes (same random draws)?"""
    t = make_view_transform(sensor, names, 32)
    x = _batch(len(names), n=16)
    y = x.clone()
    y[:, 0] = torch.randn(y[:, 0].shape, generator=_gen(9))
    return not torch.equal(t(x, _gen(1))[:, 1], t(y, _gen(1))[:, 1])


def test_no_colour_mixing_on_sar_but_on_rgb():
    assert not _mixes_channels("sar", ("VV", "VH"))
    assert _mixes_channels("optical", ("R", "G", "B"))  # grayscale / saturation mix bands


def test_geometry_identity_and_dihedral():
    x = _batch(2, n=4, size=16)
    same = random_geometry(x, 16, _gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                           rotate=False)
    assert torch.allclose(same, x, atol=1e-5)
    y = random_geometry(x, 16, _gen(2), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(4):  # every sample is one of the 8 flips/rotations of its input
        cands = [torch.rot90(v, k, dims=(1, 2)) for v in (x[i], x[i].flip(2))
                 for k in range(4)]
        assert any(torch.allclose(y[i], c, atol=1e-5) for c in cands)


def test_blur_keeps_constants_and_lowers_the_spread():
    x = torch.full((3, 2, 20, 20), 2.5)
    assert torch.allclose(gaussian_blur(x, _gen(), p=1.0), x, atol=1e-6)
    z = _batch(2, n=3, size=20)
    blurred = gaussian_blur(z, _gen(), p=1.0)
    assert blurred.std() < z.std()


def test_speckle_has_unit_mean_in_linear_power():
    x = torch.zeros(200, 1, 16, 16)  # 0 dB after de-normalisation with std 1
    y = speckle(x, _gen(4), std_db=torch.ones(1), p=1.0, looks=(4, 4))
    power = 10 ** (y / 10)
    assert power.mean().item() == pytest.approx(1.0, abs=0.01)
    assert power.var().item() == pytest.approx(1 / 4, rel=0.05)  # Gamma(L, 1/L): variance 1/L


def test_augment_presets():
    names = ("R", "G", "B")
    paper = make_view_transform("optical", names, 32, augment="paper")
    chips = make_view_transform("optical", names, 32)
    assert paper.params == AUGMENT_PRESETS["paper"] and chips.params == AUGMENT_PRESETS["chips"]
    assert "blur" in paper.steps() and "blur" not in chips.steps()
    x = _batch(3, n=16)
    # the chips preset keeps colour: views stay closer to the input than the paper's
    dist = {n: (t(x, _gen(1)) - random_geometry(x, 32, _gen(1), scale=t.params.crop_scale))
            .abs().mean() for n, t in (("paper", paper), ("chips", chips))}
    assert dist["chips"] < dist["paper"]
    with pytest.raises(UserError, match="chips"):
        make_view_transform("optical", names, 32, augment="strong")


def test_unknown_sensor_is_a_user_error():
    with pytest.raises(UserError, match="optical"):
        make_view_transform("lidar", ("Z",), 32)
