"""How the ranks of a training run share one optimisation step: the part that differs between
the single process and data parallelism (DHP replaces the whole step by pipeline stages).

The epoch loop in `hpcsrl.train.loop` codes against `Distribution`; `SingleProcess` is the
identity. A data-parallel implementation (`hpcsrl.parallel`) wraps the optimiser so gradients are
averaged, broadcasts the initial state from rank 0 and averages logged metrics.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Distribution(Protocol):
    rank: int
    size: int

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes logs, checkpoints and reports (rank 0)."""

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module
                       ) -> torch.optim.Optimizer: ...

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        """Make every rank start from rank 0's model, optimiser and `extra` (returned)."""

    def average(self, value: float, name: str) -> float:
        """Mean of a scalar over ranks (metrics only: losses, throughput)."""

    def agree(self, ok: bool) -> bool:
        """True on every rank only if `ok` is true on every rank (collective error handling)."""


class SingleProcess:
    """One process trains alone: every operation is the identity."""

    rank = 0
    size = 1

    @property
    def is_writer(self) -> bool:
        return True

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module
                       ) -> torch.optim.Optimizer:
        return opt

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        return extra

    def average(self, value: float, name: str) -> float:
        return value

    def agree(self, ok: bool) -> bool:
        return ok
