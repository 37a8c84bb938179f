"""Checkpoint files: one dict per file, written atomically, read back with a one-line error.

Loading uses `torch.load(weights_only=True)`, so a checkpoint can only contain tensors and plain
Python values (never arbitrary pickled objects); RNG states are stored in that form.
"""

from __future__ import annotations

import os
import pickle
import random
import re
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
    """Load a checkpoint on the CPU; a missing, unsafe, corrupt or foreign file -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _WEIGHTS_ONLY_REFUSAL in str(exc):
            raise UserError(f"{path}: refused as unsafe: it holds pickled objects or code"
                            f"{_culprit(exc)}, not only tensors and plain values, and hpcsrl never "
                            "runs code from a checkpoint (torch.load weights_only=True); use one "
                            "written by `hpcsrl pretrain`") from None
        raise _unreadable(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not an hpcsrl checkpoint (written by `hpcsrl pretrain`)")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                        f"(this hpcsrl reads version {VERSION})")
    return ckpt


# torch's safe unpickler says this when a file needs more than tensors and plain values.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def _culprit(exc: Exception) -> str:
    """' (e.g. posix.system)' naming the global the safe unpickler refused, when it says."""
    found = re.search(r"\bGLOBAL ([\w.]+)", str(exc))
    return f" (e.g. {found.group(1)})" if found else ""


def _unreadable(path: Path, exc: Exception) -> UserError:
    """A corrupt or truncated file: torch's first sentence, whole (never cut mid-sentence)."""
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0].rstrip(".")
    return UserError(f"{path}: not a readable checkpoint, the file is corrupt or truncated "
                     f"({first})")


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
