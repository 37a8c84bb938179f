"""Method registry: `--method` names -> model classes, and models rebuilt from checkpoints."""

from __future__ import annotations

import inspect
import os
from typing import Any

from hpcsrl.errors import UserError
from hpcsrl.models.base import SSLMethod
from hpcsrl.models.baselines.byol import BYOL
from hpcsrl.models.baselines.dual_simclr import DualSimCLR
from hpcsrl.models.baselines.moco_v2 import MoCoV2
from hpcsrl.models.baselines.simclr import SimCLR
from hpcsrl.models.baselines.simsiam import SimSiam
from hpcsrl.models.lite_srl import LiteSRL
from hpcsrl.models.resnet import BACKBONES, DEFAULT_STEM, DEFAULT_WIDTH, backbone_shape

METHODS: dict[str, type[SSLMethod]] = {
    cls.method: cls for cls in (LiteSRL, SimSiam, BYOL, SimCLR, MoCoV2, DualSimCLR)
}
# Methods whose input is the 14-channel s1s2 tensor rather than two augmented views.
PAIRED_MODALITY_METHODS = frozenset({"dual-simclr"})


def method_options(name: str) -> dict[str, Any]:
    """Head/loss options of a method with their defaults (beyond backbone and in_channels)."""
    params = inspect.signature(METHODS[name].__init__).parameters
    return {k: p.default for k, p in params.items()
            if k not in ("self", "backbone", "in_channels")}


def build_method(name: str, backbone: str = "resnet18", in_channels: int = 3,
                 stem: str = DEFAULT_STEM, width: int = DEFAULT_WIDTH, **kw: Any) -> SSLMethod:
    """A fresh model; unknown method, backbone, stem, width or option -> UserError listing the
    valid ones. A non-default `stem` or `width` (every ResNet of the method) is recorded in
    `model.config`."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    valid = method_options(name)
    bad = sorted(set(kw) - set(valid))
    if bad:
        raise UserError(f"method {name!r} has no option {', '.join(bad)}: valid options are "
                        f"{', '.join(valid) or 'none'}")
    with backbone_shape(stem, width):
        model = METHODS[name](backbone=backbone, in_channels=in_channels, **kw)
    # absent = the default, so configs written before stems and widths still match
    if stem != DEFAULT_STEM:
        model.config["stem"] = stem
    if width != DEFAULT_WIDTH:
        model.config["width"] = width
    return model


# Options added after checkpoints were first written, with the behaviour those checkpoints had:
# a config without the key was made by that older model and must be rebuilt the same way.
LEGACY_OPTIONS: dict[str, dict[str, Any]] = {"lite-srl": {"proj_out_relu": True}}


def model_from_config(config: dict[str, Any]) -> SSLMethod:
    """Rebuild a model from its `config` dict (as stored in checkpoints)."""
    cfg = dict(config)
    name = cfg.pop("method")
    for key, value in LEGACY_OPTIONS.get(name, {}).items():
        cfg.setdefault(key, value)
    return build_method(name, **cfg)


def model_from_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None
                          ) -> tuple[SSLMethod, dict[str, Any]]:
    """(model with the checkpoint's weights, checkpoint dict).

    `expect` (e.g. {"method": "lite-srl", "in_channels": 3}) must match the stored config; a
    mismatch, a corrupt file or weights of another architecture -> UserError (one line).
    """
    from hpcsrl.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    config = ckpt.get("config")
    if not isinstance(config, dict) or "method" not in config or "model" not in ckpt:
        raise UserError(f"{path}: checkpoint has no model config/weights")
    for key, want in (expect or {}).items():
        if config.get(key) != want:
            raise UserError(f"{path}: checkpoint was made with {key}={config.get(key)!r}, "
                            f"expected {want!r} (use a matching checkpoint or options)")
    model = model_from_config(config)
    missing, unexpected = _state_mismatch(model, ckpt["model"])
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit a {config['method']}/{config.get('backbone')} "
                        f"model with {config.get('in_channels')} bands ({missing + unexpected} "
                        "mismatched tensors): the checkpoint comes from a different architecture")
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def _state_mismatch(model: SSLMethod, state: dict[str, Any]) -> tuple[int, int]:
    """(missing or wrongly shaped, unexpected) tensor counts of `state` against `model`."""
    own = model.state_dict()
    bad = sum(1 for k, v in own.items()
              if k not in state or getattr(state[k], "shape", None) != v.shape)
    return bad, sum(1 for k in state if k not in own)
