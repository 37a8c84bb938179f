"""A stage's share of the model as plain arrays, and the full plan-independent checkpoint
reassembled from every stage's share (the format `hpcsrl pretrain` writes and `hpcsrl evaluate`
reads: full model state dict, SGD state per parameter in `model.parameters()` order, scheduler)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from hpcsrl.pipeline.compute import TorchStage
from hpcsrl.pipeline.transport import is_channels_last
from hpcsrl.train.optim import OptimOptions, make_optimizer, make_scheduler

StagePart = dict[str, dict[str, Tensor]]
GROUPS = ("params", "buffers", "momentum")
# (group, name, shape, dtype, channels-last) of every tensor of a part, in sending order
PartLayout = list[tuple[str, str, tuple[int, ...], str, bool]]


def stage_part(stage: TorchStage) -> StagePart:
    """{"params", "buffers", "momentum"}: name -> this stage's live tensor (no copy: the
    checkpoint is written before training goes on)."""
    part = stage.part
    return {"params": {n: p.detach() for n, p in zip(part.param_names, part.params,
                                                      strict=True)},
            "buffers": dict(zip(part.buffer_names, part.buffers, strict=True)),
            "momentum": dict(zip(part.param_names, stage.momentum(), strict=True))}


def part_layout(part: StagePart) -> PartLayout:
    """What a receiver needs to allocate a part's tensors before they arrive as raw buffers."""
    return [(g, n, tuple(t.shape), str(t.dtype).removeprefix("torch."), is_channels_last(t))
            for g in GROUPS for n, t in part[g].items()]


def part_tensors(part: StagePart) -> list[Tensor]:
    """A part's tensors in `part_layout` order."""
    return [t for g in GROUPS for t in part[g].values()]


def empty_part(layout: PartLayout) -> tuple[StagePart, list[Tensor]]:
    """Receive buffers for a part: (the part, its tensors in layout order)."""
    part: StagePart = {g: {} for g in GROUPS}
    order = []
    for g, n, shape, dtype, channels_last in layout:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        t = torch.empty(shape, dtype=getattr(torch, dtype), memory_format=fmt)
        part[g][n] = t
        order.append(t)
    return part, order


def set_momentum(stage: TorchStage, momentum: dict[str, Tensor]) -> None:
    """Set a stage's SGD momentum from a dictionary by parameter name (--resume)."""
    with torch.no_grad():
        for n, m in zip(stage.part.param_names, stage.momentum(), strict=True):
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
    tensors: dict[str, Tensor] = {}
    momentum: dict[str, Tensor] = {}
    for p in parts:
        tensors.update(p["params"])
        tensors.update(p["buffers"])
        momentum.update(p["momentum"])
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise RuntimeError(f"stages do not cover the model: {missing[:3]} missing")
    model = OrderedDict((k, tensors[k]) for k in keys)
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
    opt_state["state"] = {i: {"momentum_buffer": momentum[n]}
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
