"""PyTorch dataset over the patch HDF5 of `preprocess/SCHEMA.md`, opened lazily in each worker.

h5py handles must not cross a fork (DataLoader workers would share one HDF5 library state), so the
constructor only reads metadata and closes the file; every process opens its own handle on first
access.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from hpcsrl.data.bands import RGB_BANDS, S1_BANDS, S2_10M, S2_BANDS
from hpcsrl.data.shards import check_shards
from hpcsrl.errors import UserError

BAND_SETS = ("rgb", "s2-10m", "s2", "s1", "s1s2")
_EPS = 1e-6


@dataclass(frozen=True)
class _Part:
    """One HDF5 dataset contributing channels: name, channel slice to read, reversed or not."""

    dataset: str
    channels: slice
    reverse: bool
    band_names: tuple[str, ...]


def _str_list(value) -> list[str]:
    """An HDF5 string-array attribute as Python strings (h5py may return bytes or str)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


def _parts_for(bands: str, names: set[str]) -> list[_Part]:
    """The datasets and channels a band set reads; None parts mean the set is unavailable."""
    # data_super is in S2_BANDS order: B02, B03, B04 are channels 1..3, read reversed.
    super_rgb = _Part("data_super", slice(1, 4), True, ("B04", "B03", "B02"))
    table: dict[str, list[_Part]] = {
        "rgb": [_Part("rgb", slice(0, 3), False, RGB_BANDS)] if "rgb" in names
        else [super_rgb],
        "s2-10m": [_Part("data_10m", slice(0, 4), False, S2_10M)],
        "s2": [_Part("data_super", slice(0, 12), False, S2_BANDS)],
        "s1": [_Part("s1", slice(0, 2), False, S1_BANDS)],
        "s1s2": [_Part("data_super", slice(0, 12), False, S2_BANDS),
                 _Part("s1", slice(0, 2), False, S1_BANDS)],
    }
    return table[bands]


def available_band_sets(names: set[str]) -> list[str]:
    """Band sets whose datasets exist in a file with these dataset names."""
    return [b for b in BAND_SETS if all(p.dataset in names for p in _parts_for(b, names))]


class PatchDataset(Dataset):
    """Patches of one band set, normalised with the file's stored per-band mean/std.

    `indices` restricts the dataset to those patch rows of the file (in the given order); all
    per-item attributes (`labels`, `multi_hot`) follow that restriction.
    """

    def __init__(self, path: str | os.PathLike, bands: str = "s2",
                 indices: Sequence[int] | np.ndarray | None = None) -> None:
        self.path = Path(path)
        if bands not in BAND_SETS:
            raise UserError(f"unknown band set {bands!r}: choose one of {', '.join(BAND_SETS)}")
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such patch file (make it with hpcsrl-preprocess)")
        self.bands = bands
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        try:
            with h5py.File(self.path, "r") as f:
                self._read_metadata(f, indices)
        except OSError as exc:
            raise UserError(f"{self.path}: not a readable HDF5 file ({exc})") from None

    def _read_metadata(self, f: h5py.File, indices) -> None:
        names = set(f.keys())
        self._parts = _parts_for(self.bands, names)
        missing = [p.dataset for p in self._parts if p.dataset not in names]
        if missing:
            have = available_band_sets(names) or ["none"]
            raise UserError(f"{self.path}: band set {self.bands!r} needs dataset(s) "
                            f"{', '.join(missing)}, absent; this file has band sets: "
                            f"{', '.join(have)}")
        if "s1" in names:  # S1 may carry VV only (e.g. single-polarisation scenes)
            n_s1 = f["s1"].shape[1]
            s1_names = tuple(_str_list(f.attrs.get("s1_bands"))) or S1_BANDS[:n_s1]
            self._parts = [_Part("s1", slice(0, n_s1), False, s1_names[:n_s1])
                           if p.dataset == "s1" else p for p in self._parts]
        check_shards(f, self.path)  # a missing or truncated shard named before any read
        n_file = f[self._parts[0].dataset].shape[0]
        if indices is None:
            self.indices = np.arange(n_file, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = (self.indices < 0) | (self.indices >= n_file)
            if bad.any():
                raise UserError(f"{self.path}: index {int(self.indices[bad][0])} out of range "
                                f"(the file has {n_file} patches)")
        means, stds = [], []
        for p in self._parts:
            mean, std = f.attrs.get(f"mean_{p.dataset}"), f.attrs.get(f"std_{p.dataset}")
            if mean is None or std is None:
                raise UserError(f"{self.path}: attribute mean_{p.dataset}/std_{p.dataset} is "
                                "missing; re-create the file with hpcsrl-preprocess")
            sel = np.arange(f[p.dataset].shape[1])[p.channels]
            sel = sel[::-1] if p.reverse else sel
            means.append(np.asarray(mean, np.float64)[sel])
            stds.append(np.asarray(std, np.float64)[sel])
        self.band_names: tuple[str, ...] = tuple(b for p in self._parts for b in p.band_names)
        self._format_version = str(f.attrs.get("format_version", ""))
        self.channels = len(self.band_names)
        self._mean = np.concatenate(means).astype(np.float32).reshape(1, -1, 1, 1)
        self._std = np.maximum(np.concatenate(stds), _EPS).astype(np.float32).reshape(1, -1, 1, 1)
        self.patch_size = int(f[self._parts[0].dataset].shape[-1])
        self.class_names: tuple[str, ...] = tuple(_str_list(f.attrs.get("class_names")))
        if "label" in names:
            self.labels = f["label"][:].astype(np.int64)[self.indices]
        else:
            self.labels = np.full(len(self.indices), -1, dtype=np.int64)
        if "classes" in names and f["classes"].shape[1] > 0:
            self.multi_hot: np.ndarray | None = f["classes"][:].astype(np.uint8)[self.indices]
        else:
            self.multi_hot = None
        self.has_labels = bool((self.labels >= 0).any())
        self.sensor = {"s1": "sar", "s1s2": "s1s2"}.get(self.bands, "optical")
        self.modality_channels: dict[str, slice] = (
            {"s2": slice(0, 12), "s1": slice(12, self.channels)} if self.bands == "s1s2" else {})

    # --- lazy per-process handle -------------------------------------------------------------
    def _file(self) -> h5py.File:
        """This process's handle, opened on first use (and re-opened after a fork)."""
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_h5"], state["_pid"] = None, None  # spawn-started workers open their own
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass

    # --- reading ---------------------------------------------------------------------------
    @property
    def mean(self) -> np.ndarray:
        """Per-band mean (physical units) the patches are normalised with, shape (C,)."""
        return self._mean.reshape(-1).copy()

    @property
    def std(self) -> np.ndarray:
        """Per-band standard deviation the patches are normalised with, shape (C,)."""
        return self._std.reshape(-1).copy()

    def fingerprint(self) -> dict[str, object]:
        """What identifies the training data of a run (so --resume refuses another file): the
        resolved path, file size, patch count, band set, patch size and schema version."""
        return {"path": str(self.path.resolve()), "bytes": self.path.stat().st_size,
                "patches": len(self), "bands": list(self.band_names),
                "patch_size": self.patch_size, "format_version": self._format_version}

    def __len__(self) -> int:
        return len(self.indices)

    def _read_rows(self, rows: slice | np.ndarray) -> np.ndarray:
        """Raw (B, C, P, P) float32 for file rows (a slice or increasing unique index array)."""
        f = self._file()
        blocks = []
        for p in self._parts:
            a = f[p.dataset][rows, p.channels]
            blocks.append(a[:, ::-1] if p.reverse else a)
        x = np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
        return x.astype(np.float32, copy=False)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        return (x - self._mean) / self._std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.indices[i])
        x = self._normalise(self._read_rows(slice(row, row + 1)))[0]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(self.labels[i])

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Many items in one HDF5 read per dataset (sorted file rows; a slice when contiguous).

        Returns x (B, C, P, P) float32 and labels (B,) int64 in the order of `indices`.
        """
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        if pos.size == 0:
            return (torch.empty((0, self.channels, self.patch_size, self.patch_size)),
                    torch.empty((0,), dtype=torch.int64))
        rows = self.indices[pos]
        uniq = np.unique(rows)  # sorted; h5py needs increasing, duplicate-free selections
        contiguous = uniq[-1] - uniq[0] + 1 == uniq.size
        sel = slice(int(uniq[0]), int(uniq[-1]) + 1) if contiguous else uniq
        x = self._normalise(self._read_rows(sel))
        x = x[np.searchsorted(uniq, rows)]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[pos].copy())
