"""scripts/demo_summary.py: the demo's three closing lines, from files shaped like its outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_summary.py"


def load_script():
    spec = importlib.util.spec_from_file_location("demo_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_demo_out(out: Path, encoder_oa: tuple[float, float]) -> Path:
    (out / "eval").mkdir(parents=True)
    with h5py.File(out / "patches.h5", "w") as f:
        f["label"] = np.zeros(97, np.int16)
        f.attrs["n_ranks"] = 2
        f.attrs["assignment"] = json.dumps([[[0, 0, 50]], [[0, 50, 60], [1, 0, 40]]])
        f.attrs["scene_names"] = ["a", "b"]
        f.attrs["balance"] = 1.0
    rows = ["encoder,mode,fraction,oa,val_oa,n_test",
            f"lite-srl,freeze,0.1000,{encoder_oa[0]},0.99,40",
            f"lite-srl,freeze,0.2000,{encoder_oa[1]},0.99,40",
            "random-init,freeze,0.1000,0.4000,0.99,40", "random-init,freeze,0.2000,0.4500,0.99,40",
            "channel-stats,knn,0.1000,0.6000,0.99,40", "channel-stats,knn,0.2000,0.6000,0.99,40"]
    (out / "eval" / "report.csv").write_text("\n".join(rows) + "\n")
    stages = [{"first_unit": 0, "last_unit": 9}, {"first_unit": 10, "last_unit": 27}]
    (out / "plan.json").write_text(json.dumps({
        "objective": "utilization", "stages": stages, "bottleneck_s": 0.25,
        "throughput_bound_per_s": 3.5, "utilization_index": None}))
    return out


def test_three_lines_and_a_plain_verdict_when_a_floor_is_not_beaten(tmp_path, capsys):
    summary = load_script()
    out = write_demo_out(tmp_path / "weak", (0.5, 0.7))
    assert summary.main([str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("patches: 97 written from 2 scenes by 2 MPI ranks (of 100 "
                               "positions, the rest cloudy or no-data)")
    assert "50 / 50" in lines[0] and "balance 1.000" in lines[0]
    assert lines[1].startswith("evaluation, test OA (40 test patches): 10 % labels: lite-srl "
                               "(freeze) 0.500, random-init 0.400, channel-stats 0.600; 20 %")
    assert lines[1].endswith("-> lite-srl (freeze) does NOT beat the channel-statistics k-NN at "
                             "10 % labels")  # at 20 % it does (0.700 > 0.600)
    assert "random-init encoder" not in lines[1]  # it does beat that floor
    assert lines[2].startswith("CWB plan (utilization): 2 stages over units 0-9 | 10-27")
    assert "bottleneck stage 0.250 s" in lines[2] and "3.50 mini-batches/s" in lines[2]
    assert "E inf" in lines[2]


def test_an_encoder_above_both_floors_is_said_to_beat_them(tmp_path, capsys):
    out = write_demo_out(tmp_path / "strong", (0.7, 0.8))
    assert load_script().main([str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "NOT" not in line and "beats both floors at every fraction" in line


def test_missing_outputs_are_named(tmp_path, capsys):
    assert load_script().main([str(tmp_path)]) == 2
    assert "lacks patches.h5, eval/report.csv, plan.json" in capsys.readouterr().err
