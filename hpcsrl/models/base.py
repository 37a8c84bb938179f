"""What every self-supervised method model provides (the contract the trainer, the CWB profiler
and the pipeline runtime code against), plus the momentum-target helper of BYOL and MoCo."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from hpcsrl.models.units import Unit, run_units


class SSLMethod(nn.Module):
    """Base class of the method models.

    - `forward(x_a, x_b) -> loss` (scalar), written as plain module calls;
    - `chain_input(x_a, x_b)` + `units()`: the same loss as a flat chain of partitionable units
      (`run_units(model.units(), model.chain_input(x_a, x_b)) == model(x_a, x_b)`);
    - `encoder`: (N, C, H, W) -> (N, encoder.feature_dim) features for evaluation;
    - `embedding(x)`: the representation the loss sees (for the collapse monitor);
    - `after_step(progress)`: momentum / queue updates after each optimiser step;
    - `config`: everything `registry.build_method` needs to rebuild the model.
    """

    method: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def chain_input(self, x_a: Tensor, x_b: Tensor) -> Any:
        """Sequential form: both views in one batch (views a then b)."""
        return torch.cat([x_a, x_b], dim=0)

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def run_chain(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        return run_units(self.units(), self.chain_input(x_a, x_b))

    def embedding(self, x: Tensor) -> Tensor:
        """The representation the loss compares: projector(backbone(x)) unless overridden."""
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def after_step(self, progress: float | None = None) -> None:
        """Runs after every optimiser step; `progress` in [0, 1] = fraction of training done."""

    def n_parameters(self) -> int:
        """Every parameter the method holds, momentum copies included (what Table 2 counts)."""
        return sum(p.numel() for p in self.parameters())


class MomentumMethod(SSLMethod):
    """A method comparing the online backbone + projector with a momentum copy (BYOL, MoCo-v2).

    The chain value is `(x, x)`: the online layers act on position 0 while the raw batch rides
    along to the last unit, which runs the momentum copy on it.
    """

    def _online(self) -> nn.Module:
        """The online modules mirrored by the momentum copy, in the copy's parameter order."""
        return nn.Sequential(self.backbone, self.projector)

    def chain_input(self, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([x_a, x_b], dim=0)
        return x, x


class MomentumTarget(nn.Module):
    """A frozen copy of online modules, updated as an exponential moving average (BYOL, MoCo).

    Parameters do not require grad; BatchNorm running statistics are copied from the online net.
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(online)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net(x)

    @torch.no_grad()
    def update(self, online: nn.Module, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online."""
        for t, o in zip(self.net.parameters(), online.parameters(), strict=True):
            t.mul_(tau).add_(o.detach(), alpha=1.0 - tau)
        for t, o in zip(self.net.buffers(), online.buffers(), strict=True):
            t.copy_(o)


def momentum_schedule(base_tau: float, progress: float | None) -> float:
    """BYOL's schedule: tau rises from base_tau to 1 along a cosine; constant without progress."""
    if progress is None:
        return base_tau
    p = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * p) + 1.0) / 2.0
