"""Numeric precision of forward passes: fp32, or bfloat16 autocast on CPUs with native bf16.

Why: on CPUs with AVX-512 BF16 (or AMX), oneDNN runs bf16 convolutions about twice as fast as
fp32 (this machine's AMD EPYC, `hpcsrl pretrain` of Lite-SRL, ResNet-18 with the small stem,
32-px views, batch 64, one thread: 43.2 vs 23.1 pairs/s). Autocast only lowers the inputs of
matrix products and convolutions: weights, gradients, optimiser state, BatchNorm buffers and
every loss stay fp32, so checkpoints, allreduce and exact resume work as in fp32. On a CPU
without native bf16 the same ops are emulated and slower than fp32: refused, not silently slow.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from hpcsrl.errors import UserError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def native_bf16() -> bool:
    """True when oneDNN runs bf16 kernels natively on this CPU (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(name: str) -> str:
    """`name` if this machine can run it fast, else a UserError saying what to pass instead."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "bf16" and not native_bf16():
        raise UserError("--precision bf16 needs a CPU with native bfloat16 (AVX-512 BF16 or "
                        "AMX); this one would emulate it, slower than fp32: use --precision fp32")
    return name


def autocast(name: str) -> contextlib.AbstractContextManager[object]:
    """The context forward passes run in: bf16 autocast on the CPU, or nothing for fp32."""
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


F = TypeVar("F", bound=Callable[..., Tensor])
LOW = (torch.bfloat16, torch.float16)


def full_precision(fn: F) -> F:
    """Run a loss in fp32 whatever the caller's autocast: its half-precision tensor arguments
    are cast to float32 (float64 stays) and autocast is off inside (cosine similarities and
    softmax logits lose too much in bf16's 8-bit mantissa; the cost is negligible next to the
    encoder)."""

    @functools.wraps(fn)
    def wrapped(*args: object, **kwargs: object) -> Tensor:
        args = tuple(a.float() if isinstance(a, Tensor) and a.dtype in LOW else a for a in args)
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
