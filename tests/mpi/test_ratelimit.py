"""slurm/tx2/ratelimit.sh: ranks really talk over a rate-limited link; the namespace goes away."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "tx2" / "ratelimit.sh"

BANDWIDTH = """
import time, numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
buf = np.zeros(2 << 20, np.uint8)
c.Barrier(); t = time.perf_counter()
for _ in range(2):
    c.Send(buf, 1) if c.rank == 0 else c.Recv(buf, 0)
c.Barrier()
if c.rank == 0:
    print(f"MBIT {2 * buf.nbytes * 8 / (time.perf_counter() - t) / 1e6:.2f}")
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _env() -> dict[str, str]:
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMP_NUM_THREADS="1")


@pytest.mark.slow
@pytest.mark.usefixtures("needs_mpirun")
def test_two_ranks_get_the_configured_rate_and_the_namespace_is_removed(tmp_path, require):
    require(os.geteuid() == 0, "root (network namespaces)")
    prog = tmp_path / "bw.py"
    prog.write_text(BANDWIDTH)
    before = _namespaces()
    proc = subprocess.run([str(SCRIPT), "--rate", "20mbit", "--", "mpirun", "--oversubscribe",
                           "--bind-to", "none", "-np", "2", sys.executable, str(prog)],
                          capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stderr
    mbit = float(re.search(r"MBIT ([0-9.]+)", proc.stdout).group(1))
    assert 12 < mbit < 21, proc.stdout  # the limit holds (and is not far below it)
    assert _namespaces() == before


@pytest.mark.parametrize("args,match", [
    (["--", "true"], "--rate is required"),
    (["--rate", "fast", "--", "true"], "expected a number"),
    (["--rate", "10mbit"], "no command given"),
    (["--bogus"], "unknown option")])
def test_bad_options_are_one_line_and_exit_2(args, match):
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and match in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_failing_command_propagates_its_exit_code_and_cleans_up(require):
    require(os.geteuid() == 0, "root (network namespaces)")
    before = _namespaces()
    proc = subprocess.run([str(SCRIPT), "--rate", "10mbit", "--", "sh", "-c", "exit 3"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3 and _namespaces() == before
