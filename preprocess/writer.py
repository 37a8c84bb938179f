"""HDF5 output: per-rank shards, exact band statistics, and the master file of virtual datasets.

Each rank writes `OUT.h5.shards/rank-RRRR.h5` under a temporary name and renames it when complete,
then writes a small JSON manifest (its ranges, per-range kept counts and statistics, and a
fingerprint of inputs and options). A re-run reuses a shard whose manifest carries the same
fingerprint, so a killed job resumes without duplicated or lost patches. Rank 0 then maps the
shards into `OUT.h5` (virtual datasets in global patch order), validates that every source exists
and the counts add up, and only then renames the master into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcsrl.data.shards import check_shards
from hpcsrl.errors import UserError
from hpcsrl.fileio import atomic_path, write_json
from preprocess.tiling import Layout

FORMAT_VERSION = 2  # 2: `data_super` stored as uint16 DN (was float32); readers take both
# Per-patch float64 sums are floored to multiples of 2**-16 and added as Python ints, so the
# statistics are exactly the same whatever the rank count (float sums would depend on grouping).
STATS_SCALE = 1 << 16


def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_path(output: Path, rank: int) -> Path:
    return shard_dir(output) / f"rank-{rank:04d}.h5"


def manifest_path(output: Path, rank: int) -> Path:
    return shard_dir(output) / f"rank-{rank:04d}.json"


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able description (inputs, options, a rank's ranges)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def file_fingerprint(path: str) -> list:
    """(size, mtime_ns) of a real file; GDAL subdataset strings and /vsi paths count by name."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return []


# --- exact statistics ------------------------------------------------------------------------

class BandStats:
    """Per-dataset, per-channel sums, sums of squares and counts of finite values (Python ints)."""

    def __init__(self, data: dict[str, dict[str, list[int]]] | None = None) -> None:
        self.data: dict[str, dict[str, list[int]]] = data or {}

    def add(self, name: str, x: np.ndarray) -> None:
        """Add a (k, C, ...) block of patches of dataset `name`."""
        k, c = x.shape[:2]
        if k == 0:
            return
        entry = self.data.setdefault(name, {"sum": [0] * c, "sumsq": [0] * c, "count": [0] * c})
        if np.issubdtype(x.dtype, np.integer):  # exact in int64 (uint16 patches up to 2**23 px)
            v = x.reshape(k, c, -1)
            sums = v.sum(axis=2, dtype=np.int64)
            sumsq = np.einsum("kcp,kcp->kc", v, v, dtype=np.int64)
            for ch in range(c):
                entry["sum"][ch] += int(sums[:, ch].sum()) * STATS_SCALE
                entry["sumsq"][ch] += int(sumsq[:, ch].sum()) * STATS_SCALE
                entry["count"][ch] += k * v.shape[2]
            return
        flat = x.reshape(k * c, -1)
        v = flat.astype(np.float64)
        finite = np.isfinite(flat)
        if finite.all():
            counts = np.full((k, c), flat.shape[1])
        else:
            v[~finite] = 0.0
            counts = finite.sum(axis=1).reshape(k, c)
        # per patch, floored to the fixed-point grid: independent of how patches are batched
        sums = np.floor(v.sum(axis=1) * STATS_SCALE).reshape(k, c)
        sumsq = np.floor(np.einsum("ij,ij->i", v, v) * STATS_SCALE).reshape(k, c)
        for ch in range(c):
            entry["sum"][ch] += sum(int(s) for s in sums[:, ch])
            entry["sumsq"][ch] += sum(int(s) for s in sumsq[:, ch])
            entry["count"][ch] += int(counts[:, ch].sum())

    def merge(self, other: BandStats) -> None:
        for name, entry in other.data.items():
            mine = self.data.setdefault(name, {k: [0] * len(v) for k, v in entry.items()})
            for key, values in entry.items():
                mine[key] = [a + b for a, b in zip(mine[key], values, strict=True)]

    def mean_std(self, name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and population std (zeros when nothing was counted)."""
        entry = self.data.get(name)
        mean, std = np.zeros(channels), np.zeros(channels)
        if entry is None:
            return mean, std
        for ch in range(channels):
            n = entry["count"][ch]
            if n == 0:
                continue
            m = Fraction(entry["sum"][ch], n * STATS_SCALE)
            var = Fraction(entry["sumsq"][ch], n * STATS_SCALE) - m * m
            mean[ch] = float(m)
            std[ch] = float(max(var, Fraction(0))) ** 0.5
        return mean, std


# --- shards ------------------------------------------------------------------------------------

class ShardWriter:
    """Append-only writer of one rank's shard (uncompressed, one chunk per patch).

    The datasets are created `capacity` rows long (the rank's assigned patches, an upper bound on
    what it keeps) and cut to the rows written at close: chunks never written take no space, and
    appends need no resize. Patches go straight to their chunks (`write_direct_chunk`), past
    HDF5's chunk cache and type conversion: a third of the CPU time of writing through slices.
    """

    def __init__(self, path: Path, layout: Layout, capacity: int = 0) -> None:
        self.path = path
        self.layout = layout
        self.n = 0
        self.capacity = capacity
        self.file = h5py.File(path, "w")
        self._later: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._datasets: dict[str, h5py.Dataset] = {}
        for name, (row, dtype) in layout.datasets().items():
            if 0 in row:  # e.g. no classes: zero-width rows cannot be chunked; made at close
                self._later[name] = (row, dtype)
                continue
            chunk = (1, *row) if len(row) >= 2 else (4096, *row)
            self._datasets[name] = self.file.create_dataset(
                name, shape=(capacity, *row), maxshape=(None, *row), dtype=dtype, chunks=chunk)

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        k = len(arrays["label"])
        if k == 0:
            return
        if self.n + k > self.capacity:
            self.capacity = max(self.n + k, 2 * self.capacity)
            for ds in self._datasets.values():
                ds.resize(self.capacity, axis=0)
        for name, ds in self._datasets.items():
            a = arrays[name]
            if ds.chunks[0] == 1 and a.dtype == ds.dtype and a.flags.c_contiguous:
                zeros = (0,) * (a.ndim - 1)
                for j in range(k):
                    ds.id.write_direct_chunk((self.n + j, *zeros), a[j])
            else:
                ds[self.n:self.n + k] = a
        self.n += k

    def close(self) -> None:
        for ds in self._datasets.values():
            ds.resize(self.n, axis=0)
        for name, (row, dtype) in self._later.items():
            self.file.create_dataset(name, shape=(self.n, *row), dtype=dtype)
        self.file.attrs["format_version"] = FORMAT_VERSION
        self.file.attrs["n_patches"] = self.n
        self.file.close()


def reusable_manifest(output: Path, rank: int, fp: str) -> dict | None:
    """The manifest of a complete shard from an earlier run with the same fingerprint, else None."""
    mpath, spath = manifest_path(output, rank), shard_path(output, rank)
    try:
        manifest = json.loads(mpath.read_text())
        if manifest.get("fingerprint") != fp:
            return None
        with h5py.File(spath, "r") as f:
            if int(f.attrs["n_patches"]) != manifest["shard_rows"]:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return manifest


def write_manifest(output: Path, rank: int, manifest: dict) -> None:
    write_json(manifest_path(output, rank), manifest)


def forget_shard(output: Path, rank: int) -> None:
    """Remove a rank's manifest before rewriting its shard (a manifest must never describe a
    shard other than the one beside it)."""
    manifest_path(output, rank).unlink(missing_ok=True)


def clean_stale(output: Path, n_ranks: int) -> None:
    """Drop temp files of killed runs and shards of ranks that no longer exist (rank 0, before
    any rank writes)."""
    folder = shard_dir(output)
    for tmp in output.parent.glob(f".{output.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        m = re.fullmatch(r"rank-(\d+)\.(h5|json)", path.name)
        if path.name.endswith(".tmp") or (m and int(m.group(1)) >= n_ranks):
            path.unlink(missing_ok=True)


# --- the master file -------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """`n` consecutive rows of a shard mapped to `n` consecutive rows of the master."""

    rank: int
    shard_start: int
    global_start: int
    n: int


def plan_pieces(ranges: Sequence[Sequence[tuple[int, int, int]]],
                kept: Sequence[Sequence[int]], bad_scenes: Iterable[int]) -> list[Piece]:
    """Map every rank's kept rows into global order, leaving out bad scenes.

    ranges[r] are rank r's (scene, start, stop) in shard order and kept[r] the rows each wrote.
    Adjacent pieces that continue each other in both shard and master are merged (a split
    assignment gives one piece per rank).
    """
    bad = set(bad_scenes)
    entries = []
    for rank, (rs, ks) in enumerate(zip(ranges, kept, strict=True)):
        offset = 0
        for (scene, start, _), k in zip(rs, ks, strict=True):
            entries.append((scene, start, rank, offset, k))
            offset += k
    pieces: list[Piece] = []
    g = 0
    for scene, _, rank, offset, k in sorted(entries):
        if scene in bad or k == 0:
            continue
        last = pieces[-1] if pieces else None
        if last and last.rank == rank and last.shard_start + last.n == offset:
            pieces[-1] = Piece(rank, last.shard_start, last.global_start, last.n + k)
        else:
            pieces.append(Piece(rank, offset, g, k))
        g += k
    return pieces


def write_master(output: Path, layout: Layout, pieces: Sequence[Piece], shard_rows: Sequence[int],
                 attrs: dict[str, Any]) -> int:
    """Write, validate and atomically rename the master file; returns the patch count."""
    n = sum(p.n for p in pieces)
    rel = {r: os.path.relpath(shard_path(output, r), output.parent) for r in range(len(shard_rows))}
    with atomic_path(output) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            for name, (row, dtype) in layout.datasets().items():
                if 0 in row or n == 0:
                    f.create_dataset(name, shape=(n, *row), dtype=dtype)
                    continue
                vl = h5py.VirtualLayout(shape=(n, *row), dtype=dtype)
                for p in pieces:
                    src = h5py.VirtualSource(rel[p.rank], name, shape=(shard_rows[p.rank], *row),
                                             dtype=dtype)
                    vl[p.global_start:p.global_start + p.n] = src[p.shard_start:
                                                                  p.shard_start + p.n]
                f.create_virtual_dataset(name, vl)
            for key, value in attrs.items():
                f.attrs[key] = value
        validate(tmp, layout, n, shard_dir_of=output)
    return n


def validate(path: Path, layout: Layout, n_expected: int, shard_dir_of: Path | None = None) -> None:
    """Every dataset has n_expected rows and every virtual source file exists, opens, and holds
    the rows it is mapped from (a missing source would silently read as zeros)."""
    master = shard_dir_of or path
    with h5py.File(path, "r") as f:
        for name, (row, _) in layout.datasets().items():
            if name not in f:
                raise UserError(f"{path}: dataset {name} missing after writing")
            ds = f[name]
            if ds.shape != (n_expected, *row):
                raise UserError(f"{path}: dataset {name} has shape {ds.shape}, expected "
                                f"{(n_expected, *row)}")
        check_shards(f, master)
