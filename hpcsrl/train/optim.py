"""The optimiser and LR schedule of pre-training, built once for every trainer (single process,
Horovod ranks, DHP stages: each gets the same SGD over its own parameters and the same schedule
by global iteration)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import Tensor

from hpcsrl.errors import UserError
from hpcsrl.precision import autocast
from hpcsrl.schedules import CosineDecay


class OptimOptions(Protocol):
    momentum: float
    weight_decay: float

    @property
    def base_lr(self) -> float: ...


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimOptions,
                   lr: float | None = None, nesterov: bool = False) -> torch.optim.SGD:
    """SGD with momentum and weight decay at `lr` (default: the config's base rate)."""
    return torch.optim.SGD(list(params), lr=cfg.base_lr if lr is None else lr,
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=nesterov and cfg.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int,
                   factor: object | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration LR factor (default: cosine decay to 0 over `total_steps`); the factor is an
    object so the scheduler's state_dict stores its parameters for exact resume."""
    return torch.optim.lr_scheduler.LambdaLR(opt, factor or CosineDecay(total_steps))


def accumulated_step(opt: torch.optim.Optimizer, loss_of: Callable[..., Tensor],
                     parts: Iterable[tuple[Tensor, ...]], k: int, lr: float,
                     precision: str = "fp32") -> Tensor:
    """One optimiser step over k micro-batches (each loss / k, gradients summed, so data
    parallelism allreduces once), forward passes at `precision` (`hpcsrl.precision`); a
    non-finite loss is a UserError naming `lr`. Returns the mean local loss, detached."""
    opt.zero_grad()  # set_to_none (torch's default; Horovod's takes no argument)
    total = torch.zeros(())
    for part in parts:
        with autocast(precision):
            loss = loss_of(*part)
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()}: lower --lr (now {lr:g})")
        (loss if k == 1 else loss / k).backward()
        total = total + loss.detach()
    opt.step()
    return total / k
