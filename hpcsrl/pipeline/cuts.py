"""Stages as contiguous slices of a method's units, and what crosses each cut, described once.

A cut descriptor (`CutSpec`) lists the tensors of the chain value at a cut (shape, dtype, memory
layout, whether a gradient flows back through it), so a receiver preallocates its buffers once and
no gradient is ever sent for a detached part such as `sg(e)`. Descriptors come from one forward
pass of the whole chain on the `meta` device: no memory, no data, identical on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpcsrl.models.base import SSLMethod
from hpcsrl.models.registry import model_from_config
from hpcsrl.models.units import Unit, tensors_of


@dataclass(frozen=True)
class TensorSpec:
    """One tensor crossing a cut."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    grad: bool  # a gradient flows back through it

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def empty(self) -> Tensor:
        return torch.empty(self.shape, dtype=self.dtype, memory_format=self.memory_format)

    def dense(self, t: Tensor) -> Tensor:
        """`t` laid out as the receiver expects (a no-op when it already is)."""
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(f"cut tensor {tuple(t.shape)}/{t.dtype} does not match its "
                             f"descriptor {self.shape}/{self.dtype}")
        return t.detach().contiguous(memory_format=self.memory_format)


@dataclass(frozen=True)
class CutSpec:
    """The chain value at one cut: a bare tensor (`packed` False) or a flat tuple of tensors."""

    tensors: tuple[TensorSpec, ...]
    packed: bool

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def grad_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.grad)

    @property
    def grad_index(self) -> list[int]:
        return [i for i, t in enumerate(self.tensors) if t.grad]

    def flatten(self, h: Any) -> list[Tensor]:
        ts = tensors_of(h)
        if len(ts) != len(self.tensors):
            raise ValueError(f"chain value has {len(ts)} tensors, the cut describes "
                             f"{len(self.tensors)}")
        return [spec.dense(t) for spec, t in zip(self.tensors, ts, strict=True)]

    def rebuild(self, ts: Sequence[Tensor]) -> Any:
        return tuple(ts) if self.packed else ts[0]

    def grad_specs(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.grad]


def spec_of(h: Any, channels_last: bool = False) -> CutSpec:
    """The descriptor of chain value `h`; with `channels_last`, 4-D tensors travel channels-last
    (the layout CPU convolutions, BN and pooling keep; the meta device does not track it, and a
    relayout at a cut would change BatchNorm's summation order, so no longer be bit-exact)."""
    ts = tensors_of(h)
    if isinstance(h, (tuple, list)) and any(isinstance(x, (tuple, list)) for x in h):
        raise ValueError("nested chain values cannot cross a cut")
    return CutSpec(tuple(TensorSpec(tuple(t.shape), t.dtype, channels_last and t.dim() == 4,
                                    t.requires_grad) for t in ts),
                   isinstance(h, (tuple, list)))


def describe_cuts(config: dict[str, Any], batch_size: int, channels: int, input_size: int,
                  cuts: Sequence[int], channels_last: bool = True) -> list[CutSpec]:
    """The descriptor of every cut (cut c lies between unit c-1 and unit c) for mini-batches of
    `batch_size` two-view samples, from a forward pass on the meta device."""
    with torch.device("meta"):
        model = model_from_config(config)
        model.train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        shape = (batch_size, channels, input_size, input_size)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x_a = torch.empty(shape).contiguous(memory_format=fmt)
        x_b = torch.empty(shape).contiguous(memory_format=fmt)
        h = model.chain_input(x_a, x_b)
        units = model.units()
        want = sorted(set(cuts))
        if want and not 0 < want[0] <= want[-1] < len(units):
            raise ValueError(f"cuts {list(cuts)} outside 1..{len(units) - 1}")
        specs: dict[int, CutSpec] = {}
        for i, (_, unit) in enumerate(units[:want[-1]] if want else []):
            h = unit(h)
            if i + 1 in want:
                specs[i + 1] = spec_of(h, channels_last)
    return [specs[c] for c in cuts]


def stage_bounds(cuts: Sequence[int], n_units: int) -> list[tuple[int, int]]:
    """[(first, end)] unit ranges of the stages for cuts c_1 < ... < c_{n-1}."""
    edges = [0, *cuts, n_units]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


@dataclass
class StageSlice:
    """A stage's units with the names (in the full model) of the tensors it owns."""

    units: list[Unit]
    param_names: list[str]   # in `model.parameters()` order
    param_index: list[int]   # positions in `model.parameters()` (optimiser state in checkpoints)
    buffer_names: list[str]
    params: list[nn.Parameter]
    buffers: list[Tensor]


def slice_stage(model: SSLMethod, first: int, end: int) -> StageSlice:
    """Units first..end-1 of `model` and the parameters/buffers they hold (a module shared by
    several units, like a ReLU, is counted once)."""
    units = model.units()[first:end]
    own_p = {id(p) for _, u in units for p in u.parameters()}
    own_b = {id(b) for _, u in units for b in u.buffers()}
    pnames, pidx, params = [], [], []
    for i, (name, p) in enumerate(model.named_parameters()):
        if id(p) in own_p:
            pnames.append(name)
            pidx.append(i)
            params.append(p)
    bnames, bufs = [], []
    for name, b in model.named_buffers():
        if id(b) in own_b:
            bnames.append(name)
            bufs.append(b)
    return StageSlice(units, pnames, pidx, bnames, params, bufs)


def chain_input_only(model: SSLMethod) -> SSLMethod:
    """A copy of `model` without modules, parameters or buffers: its `chain_input` (plain
    attributes only, e.g. a band split) for a first stage that holds no other part of the model;
    a few hundred bytes when pickled."""
    shell = copy.copy(model)
    shell.__dict__.update(_modules={}, _parameters={}, _buffers={})
    return shell


def check_disjoint(model: SSLMethod, bounds: Sequence[tuple[int, int]]) -> None:
    """Every parameter belongs to exactly one stage (a tied weight across a cut cannot be
    updated locally)."""
    seen: dict[str, int] = {}
    for s, (a, b) in enumerate(bounds):
        for name in slice_stage(model, a, b).param_names:
            if name in seen:
                raise ValueError(f"parameter {name} is used by stages {seen[name]} and {s}")
            seen[name] = s
