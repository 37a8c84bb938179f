"""Atomic output: write under a temporary name in the same folder, then rename into place.

A killed job therefore never leaves a partial file that looks complete under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path_for(final: str | os.PathLike) -> Path:
    """Sibling temp name (same filesystem, so the rename is atomic); unique per process."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; rename it to `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
