"""Shared fixtures: the real-data folder (skips when absent) and a real `mpirun` launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HPCSRL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real Sentinel samples, EuroSAT RGB); skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def mpirun(np_: int, args: list[str], timeout: float = 300, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Start `np_` real ranks on this machine (oversubscribed, one thread each) and wait."""
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    full_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    OMP_NUM_THREADS="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    full_env.update(env or {})
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np", str(np_),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


@pytest.fixture
def run_mpi():
    """The `mpirun` helper as a fixture: run_mpi(2, [sys.executable, '-m', ...])."""
    return mpirun


PYTHON = sys.executable
