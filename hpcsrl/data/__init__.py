"""Patch data for training: the HDF5 dataset (and sensor band tables in `bands`).

`PatchDataset` is imported lazily so that `hpcsrl.data.bands` stays usable without torch (the
preprocessing ranks import it and should not pay for a torch import).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BAND_SETS", "PatchDataset", "available_band_sets"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from hpcsrl.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'hpcsrl.data' has no attribute {name!r}")
