"""The partitionable-unit contract shared by models, the CWB profiler/planner and the DHP runtime.

A method model exposes its training step as a flat chain of units:
    h = model.chain_input(x_a, x_b)          # e.g. both views concatenated (sequential form)
    for name, unit in model.units(): h = unit(h)
    loss = h                                  # the last unit returns the scalar loss
`h` between units is a Tensor or a tuple of Tensors (whatever crosses a cut is sent over the
wire). A residual block or any parallel zone is a single unit, so any cut between two units is
legal. Running the chain must give the same loss (and gradients) as `model(x_a, x_b)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

Unit = tuple[str, nn.Module]


def run_units(units: Sequence[Unit], h: Any) -> Any:
    """Apply units in order (one stage of a pipeline, or the whole chain)."""
    for _, unit in units:
        h = unit(h)
    return h


def tensors_of(h: Any) -> list[Tensor]:
    """The tensors of a chain value (a tensor or nested tuples/lists of them), in order.

    The one flattening of what crosses a cut: the profiler, the byte counts and the senders all
    see the same tensors in the same order.
    """
    if isinstance(h, Tensor):
        return [h]
    if isinstance(h, (tuple, list)):
        return [t for x in h for t in tensors_of(x)]
    return []


def tensor_bytes(h: Any) -> int:
    """Bytes of a unit's output as sent to the next unit (sum over a tuple of tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(h))
