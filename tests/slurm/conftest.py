"""A real one-node Slurm for the whole session, and a helper that submits a job (log kept).

`cluster` (tests/slurm/cluster.py) is importable because pytest puts this folder on sys.path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cluster as sc
import pytest

# CPUs the test node declares: more than this machine's cores, so 2-task jobs never pend.
CLUSTER_CPUS = 4


@pytest.fixture(scope="session")
def slurm_cluster(require) -> Iterator[sc.SlurmCluster]:
    """Private munged + slurmctld + slurmd for the session; stopped by PID even after failures.

    Without Slurm/munge or root the tests skip, and fail in strict mode (CI, `make test`).
    """
    missing = sc.missing_binaries()
    require(not missing, f"Slurm/munge not installed (missing {', '.join(missing)}; "
                         "scripts/install.sh adds slurm-wlm and munge as root)")
    require(os.geteuid() == 0, "the private test Slurm needs root (slurmd starts job steps)")
    with sc.slurm_cluster(cpus=CLUSTER_CPUS) as cluster:
        yield cluster


@dataclass
class JobRun:
    """A finished batch job: sbatch's result, the job's output file, and the cluster to blame."""

    result: sc.SbatchResult
    output_path: Path
    cluster: sc.SlurmCluster

    @property
    def output(self) -> str:
        if not self.output_path.exists():
            return ""
        return self.output_path.read_text(errors="replace")

    def report(self) -> str:
        """Everything needed to understand a failure: job output, sbatch output, daemon logs."""
        return (f"job {self.result.job_id} exited {self.result.returncode}\n"
                f"--- job output {self.output_path}\n{self.output}\n"
                f"--- sbatch stdout/stderr\n{self.result.stdout}{self.result.stderr}\n"
                f"{self.cluster.diagnostics()}")


@pytest.fixture
def submit(slurm_cluster: sc.SlurmCluster, tmp_path: Path):
    """submit(script, *script_args, sbatch=[...], timeout=s) -> JobRun, output in tmp_path."""
    counter = iter(range(1_000_000))

    def _submit(script: str | os.PathLike, *script_args: str, sbatch: list[str] | None = None,
                timeout: float = 90, env: dict[str, str] | None = None) -> JobRun:
        out = tmp_path / f"job-{next(counter)}.out"
        args = [f"--output={out}", f"--chdir={tmp_path}", *(sbatch or []), str(script),
                *script_args]
        result = slurm_cluster.sbatch(args, timeout=timeout, env=env)
        return JobRun(result, out, slurm_cluster)

    return _submit
