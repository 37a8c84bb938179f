"""Checks of a patch file's virtual datasets against their shard files (preprocess/SCHEMA.md).

HDF5 reads a missing source file as zeros, and a truncated one fails with an error that names
only the master file; both the writer (before renaming the master into place) and PatchDataset
(before training on it) refuse such a file with one line naming the shard.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from hpcsrl.errors import UserError


def check_shards(f: h5py.File, master: Path, base: Path | None = None) -> None:
    """Every source of every virtual dataset in `f` exists, opens, and holds the mapped dataset
    with at least the mapped rows. `master` names the file in messages; sources are relative to
    `base` (default: the master's folder)."""
    base = master.parent if base is None else base
    rows: dict[Path, dict[str, int]] = {}  # each shard opened once
    for name, ds in f.items():
        if not isinstance(ds, h5py.Dataset) or not ds.is_virtual:
            continue
        for vs in ds.virtual_sources():
            if vs.file_name == ".":
                continue
            src = base / vs.file_name
            if src not in rows:
                rows[src] = _shard_rows(src, master)
            have = rows[src].get(vs.dset_name.lstrip("/"))
            if have is None:
                raise UserError(f"{src}: dataset {vs.dset_name} missing (a shard of {master}); "
                                "re-run hpcsrl-preprocess")
            stop = _rows_mapped(vs.src_space)
            if stop > have:
                raise UserError(f"{src}: {vs.dset_name} has {have} rows, {master} maps {stop} "
                                f"(for {name}); re-run hpcsrl-preprocess")


def _rows_mapped(space: h5py.h5s.SpaceID) -> int:
    """One past the last source row a virtual mapping reads (0 when it reads none)."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_NONE:
        return 0
    if kind == h5py.h5s.SEL_ALL:
        return space.shape[0] if space.shape else 0
    return space.get_select_bounds()[1][0] + 1


def _shard_rows(src: Path, master: Path) -> dict[str, int]:
    """Rows of each dataset of one shard, or a UserError naming the shard."""
    if not src.is_file():
        raise UserError(f"{master}: its shard {src} is missing; keep the .shards folder next to "
                        "the file or re-run hpcsrl-preprocess")
    try:
        with h5py.File(src, "r") as s:
            return {k: v.shape[0] for k, v in s.items() if isinstance(v, h5py.Dataset)}
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{src}: this shard of {master} cannot be read, probably truncated or "
                        f"corrupt ({reason}); delete it and re-run hpcsrl-preprocess") from None
