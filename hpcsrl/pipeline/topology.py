"""Which rank is which stage replica, and the communicators that follow (pure layout + MPI split).

Ranks are laid out stage by stage: with replicas 3/2/1, ranks 0-2 are stage 0, 3-4 stage 1,
5 stage 2. Fixed chain c is replica c mod r_s of every stage s (`schedule.FixedChains`).
Rank 0 (stage 0, replica 0) also hosts the scheduler and writes checkpoints and reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layout:
    replicas: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.replicas or min(self.replicas) < 1:
            raise ValueError(f"every stage needs at least one replica, got {self.replicas}")

    @classmethod
    def of(cls, replicas: Sequence[int]) -> Layout:
        return cls(tuple(int(r) for r in replicas))

    @property
    def stages(self) -> int:
        return len(self.replicas)

    @property
    def size(self) -> int:
        return sum(self.replicas)

    def first_rank(self, stage: int) -> int:
        return sum(self.replicas[:stage])

    def rank_of(self, stage: int, replica: int) -> int:
        if not 0 <= replica < self.replicas[stage]:
            raise ValueError(f"stage {stage} has {self.replicas[stage]} replicas, "
                             f"not {replica + 1}")
        return self.first_rank(stage) + replica

    def ranks_of(self, stage: int) -> list[int]:
        a = self.first_rank(stage)
        return list(range(a, a + self.replicas[stage]))

    def stage_of(self, rank: int) -> int:
        for s in range(self.stages):
            if rank < self.first_rank(s) + self.replicas[s]:
                return s
        raise ValueError(f"rank {rank} outside a layout of {self.size} ranks")

    def replica_of(self, rank: int) -> int:
        return rank - self.first_rank(self.stage_of(rank))

    def describe(self, rank: int) -> str:
        return f"rank {rank} (stage {self.stage_of(rank)}, replica {self.replica_of(rank)})"


@dataclass
class Comms:
    """The communicators of one rank: point-to-point tensors, scheduler messages, its stage."""

    world: Any
    data: Any        # activations and gradients between stages
    sched: Any       # scheduler requests/replies, heartbeats
    stage: Any       # the replicas of this rank's stage (aggregation)
    ckpt: Any        # checkpoint and report gathering to rank 0


def make_comms(world: Any, layout: Layout) -> Comms:
    """Duplicate the world communicator per purpose (so no message of one kind can match a
    receive of another) and split one communicator per stage."""
    rank = world.Get_rank()
    stage = world.Split(color=layout.stage_of(rank), key=layout.replica_of(rank))
    return Comms(world, world.Dup(), world.Dup(), stage, world.Dup())
