"""Small inputs for the DHP tests: a labelled RGB patch file and hand-written plans."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_pretrain's writer
from test_pretrain import _write_rgb_h5 as write_rgb_h5  # noqa: E402, F401 (the DHP tests' data)

PY = sys.executable


def write_plan(path: Path, cuts: list[int], replicas: list[int], method: str = "lite-srl",
               backbone: str = "resnet18", bands: int = 3, size: int = 32, batch: int = 4,
               stage_s: list[float] | None = None, memory: int = 100_000_000,
               options: dict | None = None) -> Path:
    """A plan as `hpcsrl plan` writes it, for given cuts and replicas (unit names filled in);
    `options`: the model's non-default stem / width."""
    from hpcsrl.models.registry import build_method
    from hpcsrl.planning.profile import model_label

    options = options or {}
    names = [n for n, _ in build_method(method, backbone, in_channels=bands, **options).units()]
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
            "throughput_bound_per_s": bound, "model": model_label(method, backbone, options),
            "model_options": options,
            "batch_size": batch, "input_shape": [bands, size, size]}
    path.write_text(json.dumps(plan, indent=2))
    return path


def dhp_cmd(plan: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "hpcsrl.cli.main", "dhp", "--plan", str(plan), "--data", str(data),
            "--bands", "rgb", "--out", str(out), *extra]
