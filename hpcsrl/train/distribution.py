"""How the ranks of a training run share one optimisation step: the part that differs between
the single process and data parallelism (DHP replaces the whole step by pipeline stages).

The epoch loop in `hpcsrl.train.loop` codes against `Distribution`; `SingleProcess` is the
identity. A data-parallel implementation (`hpcsrl.parallel.horovod`) wraps the optimiser so
gradients are averaged, broadcasts the initial state from rank 0 and averages logged metrics.

Errors: set-up runs inside `everywhere`, so a bad input found on any rank stops every rank (no
rank waits forever in a collective the failed one never joins) and only the writer prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from hpcsrl.errors import UserError

T = TypeVar("T")


class RankStopped(Exception):
    """This rank stops because another rank failed; the writer rank reports why (one line)."""


class Distribution(Protocol):
    rank: int
    size: int

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes logs, checkpoints and reports (rank 0)."""

    def describe(self) -> dict[str, Any]:
        """What runs: `kind` (single, mpi, horovod), ranks and the backend's settings."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model as this distribution trains it (e.g. BatchNorm synchronised over ranks);
        parameter and buffer names are unchanged, so checkpoints stay plan-independent."""

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module,
                       backward_passes: int = 1) -> torch.optim.Optimizer:
        """The optimiser the step calls; `backward_passes` backward calls precede each step."""

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        """Make every rank start from rank 0's model, optimiser and `extra` (returned)."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (plain values, small)."""

    def average(self, value: float, name: str) -> float:
        """Mean of a scalar over ranks (metrics only: losses, throughput)."""

    def agree(self, ok: bool) -> bool:
        """True on every rank only if `ok` is true on every rank (collective error handling)."""

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        """(lowest failing rank, its message) on every rank, or None when no rank failed."""


class SingleProcess:
    """One process trains alone: every operation is the identity."""

    rank = 0
    size = 1

    @property
    def is_writer(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"kind": "single", "ranks": 1}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module,
                       backward_passes: int = 1) -> torch.optim.Optimizer:
        return opt

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        return extra

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def average(self, value: float, name: str) -> float:
        return value

    def agree(self, ok: bool) -> bool:
        return ok

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        return None if message is None else (0, message)


def everywhere(dist: Distribution, build: Callable[[], T]) -> T:
    """Run `build` on every rank; if it raised a UserError on any rank, every rank raises:
    the writer a UserError with the first failing rank's message (naming that rank when it is
    not the writer), the others `RankStopped`. `build` must not call collectives itself."""
    message: str | None = None
    value: T | None = None
    try:
        value = build()
    except UserError as exc:
        message = str(exc)
    failure = dist.first_error(message)
    if failure is None:
        return value  # type: ignore[return-value]
    rank, text = failure
    if dist.is_writer:
        raise UserError(text if rank == dist.rank else f"rank {rank} of {dist.size}: {text}")
    raise RankStopped(text)
