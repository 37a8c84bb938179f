"""Measure every partitionable unit of a model: time (median of repeats) and memory (real tensors).

Memory figures are measured, not estimated: parameters and buffers the unit holds, the gradient and
optimiser-state tensors a real optimiser step allocates for them, and the storages autograd saves
for backward during the unit's forward (seen through `saved_tensors_hooks`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hpcsrl.errors import UserError
from hpcsrl.models.units import Unit, run_units, tensor_bytes, tensors_of
from hpcsrl.planning.profile import UnitProfile

OPTIMIZERS = ("sgd", "adam")


def _rebuild(h: Any, it: Any) -> Any:
    if isinstance(h, Tensor):
        return next(it)
    if isinstance(h, (tuple, list)):
        return type(h)(_rebuild(x, it) for x in h)
    return h


def fresh_input(h: Any, grad_mask: Sequence[bool]) -> Any:
    """A detached copy of a chain value as a stage receives it: leaves, grad where it had grad."""
    flags = iter(grad_mask)
    leaves = [t.detach().requires_grad_(next(flags)) for t in tensors_of(h)]
    return _rebuild(h, iter(leaves))


def grad_mask_of(h: Any) -> list[bool]:
    return [t.requires_grad for t in tensors_of(h)]


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return s.data_ptr(), s.nbytes()


def optimizer_for(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def _backward(out: Any) -> Callable[[], None] | None:
    """A closure that back-propagates a random gradient of the output's shape (None: no grad)."""
    outs = [t for t in tensors_of(out) if t.requires_grad]
    if not outs:
        return None
    grads = [torch.randn_like(t) if t.dim() > 0 else torch.ones_like(t) for t in outs]
    return lambda: torch.autograd.backward(outs, grads)


def time_chain(units: Sequence[Unit], inp: Any, grad_mask: Sequence[bool], repeats: int,
               warmup: int) -> tuple[float, float]:
    """(forward_s, backward_s) medians of running `units` on `inp` as a stage would.

    The input is a fresh leaf each time (requiring grad like in the whole chain, so backward also
    computes the gradient to send back); parameter gradients are cleared between runs, as after
    `zero_grad(set_to_none=True)`.
    """
    params = [p for _, u in units for p in u.parameters()]
    fw, bw = [], []
    for i in range(warmup + repeats):
        for p in params:
            p.grad = None
        x = fresh_input(inp, grad_mask)
        t0 = time.perf_counter()
        out = run_units(units, x)
        t1 = time.perf_counter()
        back = _backward(out)
        t2 = time.perf_counter()
        if back is not None:
            back()
        t3 = time.perf_counter()
        if i >= warmup:
            fw.append(t1 - t0)
            bw.append(t3 - t2)
        del out, back, x
    return statistics.median(fw), statistics.median(bw)


def saved_activation_bytes(units: Sequence[Unit], inp: Any, grad_mask: Sequence[bool],
                           exclude: set[int]) -> tuple[list[int], Any]:
    """Bytes of the unique storages autograd saves during each unit's forward (whole chain run).

    A storage saved by several units is counted once, for the first; parameter storages
    (`exclude`: data pointers) are held anyway and counted as parameters. Returns the per-unit
    bytes and the chain's output (keeping the graph alive until the caller drops it).
    """
    seen: set[int] = set(exclude)
    per_unit = [0] * len(units)
    current = [0]

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key[0] not in seen and key[1] > 0:
            seen.add(key[0])
            per_unit[current[0]] += key[1]
        return t

    h = fresh_input(inp, grad_mask)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i, (_, unit) in enumerate(units):
            current[0] = i
            h = unit(h)
    return per_unit, h


def held_tensor_bytes(module: nn.Module, seen: set[int]) -> int:
    """Parameter + buffer bytes not already counted (shared tensors count once)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = _storage_key(t)
        if key is not None and key[0] not in seen:
            seen.add(key[0])
            total += key[1]
    return total


def optimizer_state_bytes(units: Sequence[Unit], optimizer: str, inp: Any,
                          grad_mask: Sequence[bool]) -> list[int]:
    """Gradient + optimiser-state bytes per unit after one real training step of the chain.

    Counts each trainable parameter's `.grad` and the optimiser's per-parameter tensors of the
    parameter's shape (SGD momentum buffer; Adam's two moments); scalar step counters are ignored.
    Parameters are restored afterwards.
    """
    trainable: list[nn.Parameter] = []
    owner: dict[int, int] = {}
    for i, (_, unit) in enumerate(units):
        for p in unit.parameters():
            if p.requires_grad and id(p) not in owner:
                owner[id(p)] = i
                trainable.append(p)
    if not trainable:
        return [0] * len(units)
    backup = [p.detach().clone() for p in trainable]
    opt = optimizer_for(optimizer, trainable)
    opt.zero_grad(set_to_none=True)
    out = run_units(units, fresh_input(inp, grad_mask))
    back = _backward(out)
    if back is not None:
        back()
    opt.step()
    per_unit = [0] * len(units)
    for p in trainable:
        i = owner[id(p)]
        if p.grad is not None:
            per_unit[i] += p.grad.numel() * p.grad.element_size()
        for value in opt.state.get(p, {}).values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                per_unit[i] += value.numel() * value.element_size()
    with torch.no_grad():
        for p, b in zip(trainable, backup, strict=True):
            p.copy_(b)
            p.grad = None
    return per_unit


def reference_pass(units: Sequence[Unit], chain_input: Any
                   ) -> tuple[list[Any], list[list[bool]], Any]:
    """Each unit's input as the chain produces it (detached), which parts need grad, the output.

    The data itself needs no gradient; later inputs need it where the chain's value had it (a
    stop-gradient copy carried along does not).
    """
    inputs, masks = [], []
    h = chain_input
    mask = [False] * len(tensors_of(h))
    for _, unit in units:
        inputs.append(h)
        masks.append(mask)
        out = unit(fresh_input(h, mask))
        mask = grad_mask_of(out)
        h = _rebuild(out, iter([t.detach() for t in tensors_of(out)]))
    return inputs, masks, h


def measure_memory(units: Sequence[Unit], chain_input: Any, optimizer: str = "sgd"
                   ) -> list[dict[str, int]]:
    """Per unit: param_bytes (parameters + buffers), state_bytes, activation_bytes, output_bytes."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    inputs, masks, last = reference_pass(units, chain_input)
    outputs = [*inputs[1:], last]
    seen: set[int] = set()
    param_bytes = [held_tensor_bytes(u, seen) for _, u in units]
    param_ptrs = {p.untyped_storage().data_ptr() for _, u in units for p in u.parameters()}
    activation, out = saved_activation_bytes(units, chain_input, masks[0], param_ptrs)
    del out
    state = optimizer_state_bytes(units, optimizer, chain_input, masks[0])
    return [{"param_bytes": param_bytes[i], "state_bytes": state[i],
             "activation_bytes": activation[i], "output_bytes": tensor_bytes(outputs[i])}
            for i in range(len(units))]


def measure_times(units: Sequence[Unit], chain_input: Any, repeats: int = 3, warmup: int = 1,
                  progress: bool = False) -> list[tuple[float, float]]:
    """(forward_s, backward_s) of every unit run alone on its own input (medians)."""
    if repeats < 1 or warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    inputs, masks, _ = reference_pass(units, chain_input)
    items = list(enumerate(units))
    if progress:
        from hpcsrl.progress import progress_bar
        items = progress_bar(items, desc="timing units", unit="unit")
    return [time_chain([unit], inputs[i], masks[i], repeats, warmup) for i, unit in items]


def check_time_scale(time_scale: float) -> float:
    """--time-scale must be finite and > 0: NaN or inf would be written into every unit's time."""
    if not math.isfinite(time_scale) or time_scale <= 0:
        raise UserError(f"--time-scale must be a finite number > 0, got {time_scale!r}")
    return time_scale


def profile_units(units: Sequence[Unit], chain_input: Any, optimizer: str = "sgd",
                  repeats: int = 3, warmup: int = 1, time_scale: float = 1.0,
                  progress: bool = False) -> list[UnitProfile]:
    """Profile every unit of a chain on one input batch (a CWB profile's `units` list)."""
    check_time_scale(time_scale)
    memory = measure_memory(units, chain_input, optimizer)
    times = measure_times(units, chain_input, repeats, warmup, progress)
    return [UnitProfile(name=name, forward_s=fw * time_scale, backward_s=bw * time_scale, **mem)
            for (name, _), (fw, bw), mem in zip(units, times, memory, strict=True)]
