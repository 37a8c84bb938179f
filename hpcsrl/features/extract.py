"""One pass over the data: frozen-encoder features and per-band channel statistics, plus the
weight digest that proves a frozen encoder really stayed frozen."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from hpcsrl.precision import autocast
from hpcsrl.progress import progress_bar

# Reads the input patches of the given (sorted) sample indices as (n, C, P, P) float32.
BatchReader = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]

STAT_QUANTILES = (0.1, 0.5, 0.9)


class EncoderChanged(RuntimeError):
    """A frozen encoder's weights or buffers differ from before: the freeze protocol is broken."""


def state_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify_unchanged(module: nn.Module, before: str, what: str = "encoder") -> None:
    """Raise EncoderChanged unless the module's digest still equals `before`."""
    after = state_digest(module)
    if after != before:
        raise EncoderChanged(f"the frozen {what} changed during the freeze evaluation "
                             f"(state digest {before[:12]} -> {after[:12]}); results are invalid")


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * 5): per band mean, std and the 10/50/90 % quantiles."""
    flat = x.flatten(2).float()
    q = torch.quantile(flat, torch.tensor(STAT_QUANTILES, dtype=flat.dtype), dim=2)  # (3, N, C)
    parts = [flat.mean(dim=2), flat.std(dim=2, unbiased=False), *q]
    return torch.stack(parts, dim=2).flatten(1)


@torch.no_grad()
def extract(encoders: Mapping[str, nn.Module], read: BatchReader, indices: np.ndarray,
            batch_size: int = 256, with_stats: bool = True, progress: bool = True,
            precision: str = "fp32") -> dict[str, np.ndarray]:
    """Features of `indices` from every encoder (eval mode, forward at `precision`, features
    returned as float32) and the channel statistics.

    The data is read once and fed to all encoders, so floors cost no extra I/O. Returns a dict
    keyed by encoder name (plus "channel_stats"), rows in the order of `indices`.
    """
    modes = {name: enc.training for name, enc in encoders.items()}
    for enc in encoders.values():
        enc.eval()
    out: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    if with_stats:
        out["channel_stats"] = []
    starts = range(0, len(indices), batch_size)
    try:
        for s in progress_bar(starts, desc="features", unit="batch", disable=not progress,
                              leave=False):
            x = as_tensor(read(indices[s:s + batch_size])).float()
            for name, enc in encoders.items():
                with autocast(precision):
                    f = enc(x)
                out[name].append(f.flatten(1).float().numpy())
            if with_stats:
                out["channel_stats"].append(channel_stats(x).numpy())
    finally:
        for name, enc in encoders.items():
            enc.train(modes[name])
    return {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in out.items()}
