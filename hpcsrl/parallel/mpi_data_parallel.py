"""Data parallelism over MPI directly (mpi4py), as a `Distribution` of the shared epoch loop.

The same contract as `hpcsrl.parallel.horovod`: each rank trains on its shard of every global
mini-batch, gradients are averaged before every step, rank 0's state is broadcast at the start. The
difference is who communicates and when. Horovod runs a background thread that wakes every
HOROVOD_CYCLE_TIME to agree with the other ranks (a collective, busy-waiting in OpenMPI) and starts
an allreduce only at its next cycle. On a CPU node whose cores all compute, that thread takes cores
from backward and the step waits for its cycle (2 ranks on 2 cores, ResNet-18: forward + backward
0.27-0.32 s alone, 0.38-0.42 s with Horovod merely initialised, measured by a throw-away script;
benchmarks/scaling/README.md has the kept measurements). Here nothing runs beside the compute:
backward accumulates into one flat gradient buffer, and the training thread ring-allreduces it
(`ring.ring_allreduce`) just before the optimiser step, on the cores backward has just freed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from hpcsrl.parallel.replica import prepare_replica
from hpcsrl.parallel.ring import ring_allreduce


class FlatGradients:
    """The gradients of an optimiser's parameters as views of one contiguous buffer, averaged
    over the ranks by one ring-allreduce (a step pre-hook), so no copy is made per step.

    Built at the first step (the parameters' dtype may change after the optimiser is made, e.g.
    `model.double()`); re-pointed if anything replaced a gradient tensor since. `zero_grad` of
    the optimiser zeroes in place so the views survive. A parameter without a gradient in a step
    contributes zeros (as with Horovod's optimiser)."""

    def __init__(self, opt: torch.optim.Optimizer, comm: MPI.Comm, fp16: bool) -> None:
        self.params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        self.comm, self.wire = comm, (np.float16 if fp16 else None)
        self.buffer: torch.Tensor | None = None
        opt.zero_grad = functools.partial(opt.zero_grad, set_to_none=False)  # type: ignore[method-assign]
        opt.register_step_pre_hook(lambda *_: self.average())

    def _views_intact(self) -> bool:
        buf = self.buffer
        if buf is None or any(p.dtype != buf.dtype for p in self.params):
            return False
        base, size, offset = buf.data_ptr(), buf.element_size(), 0
        for p in self.params:
            if p.grad is None or p.grad.data_ptr() != base + offset * size:
                return False
            offset += p.numel()
        return True

    def _point_into_buffer(self) -> None:
        dtype = self.params[0].dtype
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype)
        offset = 0
        for p in self.params:
            view = self.buffer[offset:offset + p.numel()].view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
            offset += p.numel()

    def average(self) -> None:
        if not self._views_intact():
            self._point_into_buffer()
        assert self.buffer is not None
        ring_allreduce(self.comm, self.buffer.numpy(), self.wire)
        self.buffer /= self.comm.Get_size()


class MPIDistribution:
    """Data parallelism over every rank of MPI_COMM_WORLD, communicating from the training
    thread only (no background thread)."""

    def __init__(self, sync_bn: bool = False, fp16_allreduce: bool = False) -> None:
        self.comm = MPI.COMM_WORLD.Dup()  # our messages never match anyone else's
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.sync_bn, self.fp16_allreduce = sync_bn, fp16_allreduce

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "mpi", "ranks": self.size, "sync_bn": self.sync_bn,
                "fp16_allreduce": self.fp16_allreduce, "allreduce": "ring, training thread"}

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().contiguous().clone()
        self.comm.Allreduce(MPI.IN_PLACE, out.numpy())
        return out

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x`, rank 0's first (the same tensor on every rank)."""
        return torch.cat([torch.from_numpy(a) for a in self.comm.allgather(x.detach().numpy())])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return prepare_replica(model, self._sum, self._gather, self.size, self.sync_bn)

    def wrap_optimizer(self, opt: torch.optim.Optimizer, model: nn.Module,
                       backward_passes: int = 1) -> torch.optim.Optimizer:
        """The same optimiser, averaging the gradients before each step; the `backward_passes`
        backward calls before it simply accumulate into the buffer."""
        FlatGradients(opt, self.comm, self.fp16_allreduce)  # kept alive by its step hook
        return opt

    def broadcast_state(self, model: nn.Module, opt: torch.optim.Optimizer,
                        extra: dict | None = None) -> dict | None:
        """Rank 0's parameters and buffers in place, its optimiser state and `extra` everywhere."""
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_contiguous():
                    self.comm.Bcast(t.numpy(), root=0)
                else:
                    t.copy_(torch.from_numpy(self.comm.bcast(t.numpy(), root=0)))
        state = self.broadcast_object(opt.state_dict() if self.is_writer else None)
        if not self.is_writer:
            opt.load_state_dict(state)
        return self.broadcast_object(extra)

    def broadcast_object(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0)

    def average(self, value: float, name: str) -> float:
        return self.comm.allreduce(float(value)) / self.size

    def agree(self, ok: bool) -> bool:
        return bool(self.comm.allreduce(int(bool(ok)), op=MPI.MIN))

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        for rank, text in enumerate(self.comm.allgather(message)):
            if text is not None:
                return rank, str(text)
        return None
