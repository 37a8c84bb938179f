"""Small inputs for the DHP tests: a labelled RGB patch file and hand-written plans."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np

PY = sys.executable


def write_rgb_h5(path: Path, n: int = 40, size: int = 32, seed: int = 0) -> Path:
    """Oriented stripes of three classes (learnable), as uint8 RGB patches with labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = np.empty((n, 3, size, size), np.float32)
    for i, k in enumerate(labels):
        wave = np.sin(2 * np.pi * (3 + k) * (np.cos(k) * xx + np.sin(k) * yy)
                      + rng.uniform(0, 2 * np.pi))
        for c in range(3):
            x[i, c] = wave * (1 + 0.3 * ((c + k) % 3)) + rng.normal(0, 0.3, (size, size))
    rgb = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["patch_size"] = size
        f.attrs["class_names"] = ["a", "b", "c"]
        f["rgb"] = rgb
        f.attrs["mean_rgb"] = rgb.astype(np.float64).mean(axis=(0, 2, 3))
        f.attrs["std_rgb"] = rgb.astype(np.float64).std(axis=(0, 2, 3))
        f["label"] = labels.astype(np.int16)
        f["classes"] = np.eye(3, dtype=np.uint8)[labels]
    return path


def write_plan(path: Path, cuts: list[int], replicas: list[int], method: str = "lite-srl",
               backbone: str = "resnet18", bands: int = 3, size: int = 32, batch: int = 4,
               stage_s: list[float] | None = None, memory: int = 100_000_000) -> Path:
    """A plan as `hpcsrl plan` writes it, for given cuts and replicas (unit names filled in)."""
    from hpcsrl.models.registry import build_method

    names = [n for n, _ in build_method(method, backbone, in_channels=bands).units()]
    edges = [0, *cuts, len(names)]
    stage_s = stage_s or [1.0] * len(replicas)
    stages = [{"first_unit": a, "last_unit": b - 1, "first_name": names[a],
               "last_name": names[b - 1], "compute_s": t, "transfer_s": 0.0,
               "memory_bytes": memory, "device_memory_bytes": memory, "replicas": r,
               "busy_s": sum(stage_s[i:])}
              for i, (a, b, r, t) in enumerate(zip(edges, edges[1:], replicas, stage_s,
                                                              strict=False))]
    bound = min(r / sum(stage_s[i:]) for i, r in enumerate(replicas))
    plan = {"objective": "throughput", "cuts": cuts, "stages": stages,
            "throughput_bound_per_s": bound, "model": f"{method}/{backbone}",
            "batch_size": batch, "input_shape": [bands, size, size]}
    path.write_text(json.dumps(plan, indent=2))
    return path


def dhp_cmd(plan: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "hpcsrl.cli.main", "dhp", "--plan", str(plan), "--data", str(data),
            "--bands", "rgb", "--out", str(out), *extra]
