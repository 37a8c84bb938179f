"""What one stage computes for a mini-batch, behind the small interface the runtime codes against.

The runtime (transport, scheduler, aggregation) only calls `StageCompute`: it never looks at
modules or data. `TorchStage` runs real units; an emulation (sleep profiled times, produce tensors
of profiled sizes) implements the same four methods and keeps everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from hpcsrl.models.units import run_units, tensors_of
from hpcsrl.pipeline.cuts import CutSpec, StageSlice


class StageCompute(Protocol):
    """One stage of a chain.

    `in_spec` / `out_spec` describe the cut before / after the stage (None on the first / last
    stage). The runtime calls, for each mini-batch it holds:
      outputs = forward(mb, inputs)   inputs: tensors of `in_spec` (None on the first stage);
                                      outputs: tensors of `out_spec` (None on the last stage)
      grads_in = backward(grads_out)  grads_out: tensors for `out_spec`'s grad-carrying parts
                                      (None on the last stage, which starts from its loss);
                                      grads_in: for `in_spec`'s grad-carrying parts (None first)
      step(mb)                        the optimiser update at mini-batch mb's global iteration
    `state()` are the float tensors that replicas average (parameters, BatchNorm statistics,
    momentum), `counters()` the integer ones (summed by increments), `loss` the last loss (last
    stage only).
    """

    in_spec: CutSpec | None
    out_spec: CutSpec | None
    loss: float | None

    def forward(self, mb: int, inputs: list[Tensor] | None) -> list[Tensor] | None: ...

    def backward(self, grads: list[Tensor] | None) -> list[Tensor] | None: ...

    def step(self, mb: int) -> None: ...

    def state(self) -> list[Tensor]: ...

    def counters(self) -> list[Tensor]: ...


class TorchStage:
    """A contiguous slice of a method's units with its own SGD over its own parameters.

    `source(mb)` gives the chain input of mini-batch `mb` (first stage only: it reads the data and
    makes the views); `lr_at(mb)` the learning rate of mini-batch `mb`'s global iteration.
    """

    def __init__(self, part: StageSlice, in_spec: CutSpec | None, out_spec: CutSpec | None,
                 optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float],
                 source: Callable[[int], Any] | None = None) -> None:
        if (in_spec is None) != (source is not None):
            raise ValueError("the first stage (no in_spec) needs a data source, others none")
        self.part, self.in_spec, self.out_spec = part, in_spec, out_spec
        self.opt, self.lr_at, self.source = optimizer, lr_at, source
        self.loss: float | None = None
        self._inputs: list[Tensor] = []
        self._out: Any = None

    def forward(self, mb: int, inputs: list[Tensor] | None) -> list[Tensor] | None:
        if self.in_spec is None:
            assert self.source is not None
            h = self.source(mb)
            self._inputs = []
        else:
            assert inputs is not None
            self._inputs = [t.detach().requires_grad_(s.grad)
                            for t, s in zip(inputs, self.in_spec.tensors, strict=True)]
            h = self.in_spec.rebuild(self._inputs)
        out = run_units(self.part.units, h)
        self._out = out
        if self.out_spec is None:
            self.loss = float(out.detach())
            return None
        return self.out_spec.flatten(out)

    def backward(self, grads: list[Tensor] | None) -> list[Tensor] | None:
        out, self._out = self._out, None
        if self.out_spec is None:
            out.backward()
        else:
            assert grads is not None
            ts = [t for t, s in zip(tensors_of(out), self.out_spec.tensors, strict=True) if s.grad]
            torch.autograd.backward(ts, list(grads))
        del out
        if self.in_spec is None:
            return None
        back = []
        for t, s in zip(self._inputs, self.in_spec.tensors, strict=True):
            if s.grad:
                back.append(s.dense(t.grad) if t.grad is not None else
                            torch.zeros(s.shape, dtype=s.dtype, memory_format=s.memory_format))
        self._inputs = []
        return back

    def step(self, mb: int) -> None:
        lr = self.lr_at(mb)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def momentum(self) -> list[Tensor]:
        """Each parameter's SGD momentum buffer (created as zeros before the first step)."""
        out = []
        for p in self.part.params:
            st = self.opt.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out.append(st["momentum_buffer"])
        return out

    def state(self) -> list[Tensor]:
        floats = [b for b in self.part.buffers if b.is_floating_point()]
        return [*(p.data for p in self.part.params), *floats, *self.momentum()]

    def counters(self) -> list[Tensor]:
        return [b for b in self.part.buffers if not b.is_floating_point()]
