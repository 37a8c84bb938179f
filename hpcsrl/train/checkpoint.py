"""Checkpoint files: one dict per file, written atomically, read back with a one-line error.

Loading uses `torch.load(weights_only=True)`, so a checkpoint can only contain tensors and plain
Python values (never arbitrary pickled objects); RNG states are stored in that form.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcsrl.errors import UserError
from hpcsrl.fileio import atomic_path

FORMAT = "hpcsrl-checkpoint"
VERSION = 1


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` (plus format tags) so that `path` is either the old or the new file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a missing, corrupt or foreign file -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable checkpoint (corrupt or truncated? {first[:160]})"
                        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not an hpcsrl checkpoint (written by `hpcsrl pretrain`)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                        f"(this hpcsrl reads version {VERSION})")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Global torch / numpy / python RNG states in weights_only-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                      int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
