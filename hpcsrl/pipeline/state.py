"""A stage's share of the model as plain arrays, and the full plan-independent checkpoint
reassembled from every stage's share (the format `hpcsrl pretrain` writes and `hpcsrl evaluate`
reads: full model state dict, SGD state per parameter in `model.parameters()` order, scheduler)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hpcsrl.pipeline.compute import TorchStage
from hpcsrl.train.optim import OptimOptions, make_optimizer, make_scheduler

StagePart = dict[str, dict[str, np.ndarray]]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy().copy()


def stage_part(stage: TorchStage) -> StagePart:
    """{"params", "buffers", "momentum"}: name -> array, for this stage's tensors."""
    part = stage.part
    return {"params": {n: _np(p) for n, p in zip(part.param_names, part.params, strict=True)},
            "buffers": {n: _np(b) for n, b in zip(part.buffer_names, part.buffers, strict=True)},
            "momentum": {n: _np(m) for n, m in zip(part.param_names, stage.momentum(),
                                                    strict=True)}}


def load_part(stage: TorchStage, model_state: dict[str, Tensor],
              momentum: dict[str, Tensor]) -> None:
    """Set a stage's parameters, buffers and momentum from full-model dictionaries."""
    part = stage.part
    with torch.no_grad():
        for n, p in zip(part.param_names, part.params, strict=True):
            p.copy_(torch.as_tensor(model_state[n]))
        for n, b in zip(part.buffer_names, part.buffers, strict=True):
            b.copy_(torch.as_tensor(model_state[n]))
        for n, m in zip(part.param_names, stage.momentum(), strict=True):
            if n in momentum:
                m.copy_(torch.as_tensor(momentum[n]))


def model_layout(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(state-dict keys in order, parameter names in `parameters()` order) of a model config."""
    from hpcsrl.models.registry import model_from_config

    with torch.device("meta"):
        model = model_from_config(config)
    return list(model.state_dict().keys()), [n for n, _ in model.named_parameters()]


def lr_factor(total_steps: int, iteration: int) -> float:
    """The cosine factor the shared scheduler gives at `iteration` (LambdaLR's last_epoch)."""
    sched = make_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1.0), total_steps)
    return float(sched.lr_lambdas[0](iteration))


def assemble(config: dict[str, Any], parts: list[StagePart], cfg: OptimOptions,
             total_steps: int, iteration: int) -> dict[str, Any]:
    """{"model", "optimizer", "scheduler"} of the full model after `iteration` global steps,
    shaped exactly as a single-process trainer's state dicts."""
    keys, pnames = model_layout(config)
    tensors: dict[str, np.ndarray] = {}
    momentum: dict[str, np.ndarray] = {}
    for p in parts:
        tensors.update(p["params"])
        tensors.update(p["buffers"])
        momentum.update(p["momentum"])
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise RuntimeError(f"stages do not cover the model: {missing[:3]} missing")
    model = OrderedDict((k, torch.from_numpy(tensors[k])) for k in keys)
    dummy = [torch.zeros(1) for _ in pnames]
    opt = make_optimizer(dummy, cfg)
    sched = make_scheduler(opt, total_steps)
    state = sched.state_dict()
    state["last_epoch"] = iteration
    state["_step_count"] = iteration + 1
    lr = cfg.base_lr * lr_factor(total_steps, iteration)
    state["_last_lr"] = [lr]
    opt_state = opt.state_dict()
    opt_state["param_groups"][0]["lr"] = lr
    opt_state["state"] = {i: {"momentum_buffer": torch.from_numpy(momentum[n])}
                          for i, n in enumerate(pnames) if n in momentum}
    return {"model": model, "optimizer": opt_state, "scheduler": state}


def split_checkpoint(ckpt: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model state, momentum by parameter name) from a checkpoint of this format."""
    _, pnames = model_layout(ckpt["config"])
    momentum = {}
    for i, st in ckpt.get("optimizer", {}).get("state", {}).items():
        buf = st.get("momentum_buffer")
        if buf is not None and int(i) < len(pnames):
            momentum[pnames[int(i)]] = buf
    return ckpt["model"], momentum


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
