"""slurm/tx2/run_dhp.sh: a hostfile, one slot per board, TCP transport (boards = localhost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dhp_helpers import write_plan, write_rgb_h5  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_run_dhp_over_a_hostfile(tmp_path: Path) -> None:
    data = write_rgb_h5(tmp_path / "p.h5", n=40)
    plan = write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[1, 1, 1])
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=3\n")
    env = dict(os.environ, HOSTFILE=str(hosts), HPCSRL_MPIRUN_ARGS="--oversubscribe",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(REPO / "slurm" / "tx2" / "run_dhp.sh"), str(plan), str(data),
                           str(tmp_path / "run"), "--bands", "rgb", "--iterations", "3",
                           "--aggregate-every", "3"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "3 rank(s)" in proc.stderr
    rep = json.loads((tmp_path / "run" / "dhp_report.json").read_text())
    assert [r["iterations"] for r in rep["ranks"]] == [3, 3, 3]
    bad = subprocess.run([str(REPO / "slurm" / "tx2" / "run_dhp.sh"), str(plan)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "PLAN.json" in bad.stderr
