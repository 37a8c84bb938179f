"""A DHP run stopped at a checkpoint resumes under another plan and rank count (a node lost:
6 ranks -> 5), and `hpcsrl evaluate` reads its final checkpoint as it is."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dhp_helpers import PY, dhp_cmd, write_plan, write_rgb_h5  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_stop_resume_with_five_ranks_then_evaluate(run_mpi, tmp_path: Path) -> None:
    from hpcsrl.train.checkpoint import read_checkpoint

    data = write_rgb_h5(tmp_path / "p.h5", n=60)
    plan6 = write_plan(tmp_path / "plan6.json", cuts=[6, 16], replicas=[3, 2, 1])
    plan5 = write_plan(tmp_path / "plan5.json", cuts=[8, 20], replicas=[2, 2, 1])
    out = tmp_path / "run"
    common = ["--iterations", "16", "--aggregate-every", "4", "--chains", "dynamic"]
    run_mpi(6, dhp_cmd(plan6, data, out, *common, "--stop-after", "8"), timeout=900)
    mid = read_checkpoint(out / "checkpoint.pt")
    assert mid["dhp"]["iteration"] == 8 and mid["dhp"]["replicas"] == [3, 2, 1]

    refused = run_mpi(5, dhp_cmd(plan5, data, out, *common), timeout=300, check=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    run_mpi(5, dhp_cmd(plan5, data, out, *common, "--resume"), timeout=900)
    final = read_checkpoint(out / "checkpoint.pt")
    assert final["dhp"]["iteration"] == 16 and final["dhp"]["replicas"] == [2, 2, 1]
    assert [h["iteration"] for h in final["history"]] == [4, 8, 12, 16]
    with (out / "dhp_assignment.csv").open() as f:
        ids = [int(r[0]) for r in list(csv.reader(f))[1:]]
    assert ids == list(range(16))  # every mini-batch once, over both runs
    rep = json.loads((out / "dhp_report.json").read_text())
    assert rep["first_iteration"] == 8 and rep["iterations"] == 8

    ev = subprocess.run([PY, "-m", "hpcsrl.cli.main", "evaluate", "--checkpoint",
                         str(out / "checkpoint.pt"), "--data", str(data), "--mode", "freeze",
                         "--label-fractions", "0.5", "--epochs", "5", "--no-tsne",
                         "--no-random-floor", "--no-knn-floor", "--threads", "1", "--quiet",
                         "--out", str(tmp_path / "eval")],
                        capture_output=True, text=True, timeout=900)
    assert ev.returncode == 0, ev.stderr
    assert any((tmp_path / "eval").iterdir())
