"""Horovod data parallelism as a `Distribution` of the shared epoch loop (hpcsrl.train).

Each rank trains on its shard of every global mini-batch; `hvd.DistributedOptimizer` averages the
gradients with ring-allreduce before every step, so all replicas take the same step and stay
identical. Rank 0 owns the output folder; the others receive its state by broadcast.

Settings that matter on CPU (measured, see benchmarks/scaling/README.md): Horovod's controller
is MPI (`DEFAULT_CONTROLLER`); HOROVOD_CONTROLLER=gloo switches controller and CPU collectives to
Gloo, started by `gloo_rendezvous` under mpirun / srun (Gloo's waits block where OpenMPI's
spin; measured so far it did not beat the grouped MPI allreduce clearly). The background thread
polls every HOROVOD_CYCLE_TIME ms and competes with compute for the cores; a longer cycle
(`DEFAULT_CYCLE_TIME_MS`, used unless the variable is set) and several backward passes per
allreduce (`--batches-per-allreduce`) keep that cost small. When a node's ranks use all its cores,
the gradients go as one grouped allreduce after backward (`groups="auto"`): with the MPI
controller, allreduces overlapping backward ran MPI on the cores backward computes on (2 ranks on
2 cores: forward + backward 1.50 s instead of 1.17 s).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from hpcsrl.errors import UserError
from hpcsrl.parallel.gloo_rendezvous import ENV_ADDR, start_gloo
from hpcsrl.parallel.replica import prepare_replica
from hpcsrl.parallel.select import cores_filled

DEFAULT_CYCLE_TIME_MS = "50"
DEFAULT_CONTROLLER = "mpi"

def auto_groups(local_ranks: int, threads: int, cores: int) -> int:
    """`groups="auto"`: 1 (one grouped allreduce after backward) when the node's ranks x compute
    threads fill its cores, else 0 (per-tensor allreduces overlapping backward on a spare core)."""
    return 1 if cores_filled(local_ranks, threads, cores) else 0


class HorovodDistribution:
    """Data parallelism over every rank of the launcher (Horovod's global process set)."""

    def __init__(self, sync_bn: bool = False, fp16_allreduce: bool = False,
                 groups: int | str = "auto") -> None:
        """`groups`: 0 = Horovod's per-tensor allreduces overlapping backward, N = N grouped
        allreduces, "auto" = `auto_groups` of the node's ranks, threads and usable cores."""
        os.environ.setdefault("HOROVOD_CYCLE_TIME", DEFAULT_CYCLE_TIME_MS)
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise UserError(f"data-parallel training needs Horovod with PyTorch ({exc}); run "
                            "scripts/install.sh, or start a single process") from None
        controller = os.environ.setdefault("HOROVOD_CONTROLLER", DEFAULT_CONTROLLER).lower()
        if controller == "gloo" and ENV_ADDR not in os.environ:  # not started by horovodrun
            if not hvd.gloo_built():
                raise UserError("HOROVOD_CONTROLLER=gloo, but this Horovod was built without "
                                "Gloo: unset it (MPI) or rebuild with HOROVOD_WITH_GLOO=1")
            start_gloo()  # before init: the controller is chosen there
        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.sync_bn, self.fp16_allreduce, self.groups = sync_bn, fp16_allreduce, groups

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "horovod", "ranks": self.size, "sync_bn": self.sync_bn,
                "fp16_allreduce": self.fp16_allreduce, "allreduce_groups": self.groups,
                "cycle_time_ms": float(os.environ["HOROVOD_CYCLE_TIME"]),
                "controller": os.environ["HOROVOD_CONTROLLER"]}

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(x, op=self.hvd.Sum)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x`, rank 0's first (the same tensor on every rank)."""
        return self.hvd.allgather(x, name="hpcsrl.gather")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """As every backend (`prepare_replica`): Horovod's collectives refuse channels-last
        tensors, so the contiguous layout matters here too."""
        return prepare_replica(model, self._sum, self._gather, self.size, self.sync_bn)

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module,
                       backward_passes: int = 1) -> torch.optim.Optimizer:
        hvd = self.hvd
        if self.groups == "auto":  # decided here: the trainer has set its threads by now
            self.groups = auto_groups(self.hvd.local_size(), torch.get_num_threads(),
                                      len(os.sched_getaffinity(0)))
        compression = hvd.Compression.fp16 if self.fp16_allreduce else hvd.Compression.none
        return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=compression, op=hvd.Average,
                                        backward_passes_per_step=backward_passes,
                                        groups=int(self.groups) or None)

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        """Rank 0's parameters and buffers in place, its optimiser state (momentum buffers,
        hyper-parameters) and `extra` on every rank.

        Not `hvd.broadcast_optimizer_state`: on a fresh optimiser it takes a zero-gradient step
        to create the state, which with weight decay moves the weights before training starts.
        """
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        state = self.broadcast_object(opt.state_dict() if self.is_writer else None)
        if not self.is_writer:
            opt.load_state_dict(state)
        return self.broadcast_object(extra)

    def broadcast_object(self, obj: Any) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name="hpcsrl.broadcast")

    def average(self, value: float, name: str) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        return float(self.hvd.allreduce(t, op=self.hvd.Average, name=f"hpcsrl.avg.{name}"))

    def agree(self, ok: bool) -> bool:
        t = torch.tensor([int(bool(ok))], dtype=torch.int64)
        return int(self.hvd.allreduce(t, op=self.hvd.Sum, name="hpcsrl.agree")) == self.size

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        messages = self.hvd.allgather_object(message, name="hpcsrl.errors")
        for rank, text in enumerate(messages):
            if text is not None:
                return rank, str(text)
        return None
