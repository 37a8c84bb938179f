"""slurm/dhp.sbatch under the real one-node Slurm (srun --mpi=pmix ranks, one per plan replica)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DHP_SBATCH = REPO / "slurm" / "dhp.sbatch"
sys.path.insert(0, str(REPO / "tests" / "mpi"))
from dhp_helpers import write_plan, write_rgb_h5  # noqa: E402


@pytest.mark.slurm
@pytest.mark.slow
def test_dhp_sbatch_trains_a_three_stage_plan(submit, tmp_path: Path) -> None:
    write_rgb_h5(tmp_path / "p.h5", n=40)
    write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[1, 1, 1])
    job = submit(DHP_SBATCH, "plan.json", "p.h5", "run", "--bands", "rgb", "--iterations", "4",
                 "--aggregate-every", "2",
                 sbatch=["-N", "1", "-n", "3", "--ntasks-per-node=3", "--cpus-per-task=1"],
                 timeout=600)
    assert job.result.returncode == 0, job.report()
    assert "3 DHP rank(s)" in job.output and "DHP exited with code 0" in job.output, job.report()
    rep = json.loads((tmp_path / "run" / "dhp_report.json").read_text())
    assert [r["iterations"] for r in rep["ranks"]] == [4, 4, 4]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_dhp_sbatch_with_the_wrong_node_count_fails_with_one_line(submit, tmp_path) -> None:
    write_rgb_h5(tmp_path / "p.h5", n=40)
    write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[1, 1, 1])
    job = submit(DHP_SBATCH, "plan.json", "p.h5", "run", "--bands", "rgb", "--iterations", "4",
                 sbatch=["-N", "1", "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1"],
                 timeout=300)
    assert job.result.returncode != 0, job.report()
    assert job.output.count("hpcsrl dhp: error:") == 1, job.report()
    assert "needs 3 ranks" in job.output, job.report()
