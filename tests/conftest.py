"""Shared fixtures: the real-data folder, a real `mpirun` launcher, and strict mode.

Strict mode (`CI=true` or `HPCSRL_STRICT=1`, which `make test` sets): a test whose stack (MPI,
Horovod, Slurm, ...) is missing fails instead of skipping, so a machine whose install silently lost
OpenMPI goes red. Only a real-data test may skip, and only when ../shared/data is absent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HPCSRL_SHARED_DATA", REPO.parent / "shared" / "data"))


def strict_mode() -> bool:
    """True under CI (`CI=true`, as CI services set it) or `HPCSRL_STRICT=1` (`make test`)."""
    return (os.environ.get("CI", "").lower() in ("true", "1", "yes")
            or os.environ.get("HPCSRL_STRICT", "") not in ("", "0"))


STRICT = strict_mode()
Skipped = pytest.skip.Exception
STRICT_NOTE = "strict mode (CI=true or HPCSRL_STRICT=1): a missing stack fails, it does not skip"


class RealDataAbsent(Skipped):
    """The one skip strict mode allows: the real samples of ../shared/data are not here."""


def require(condition: bool, what: str) -> None:
    """Skip the test when `condition` is false, or fail it in strict mode; `what` says what is
    missing and how to get it (e.g. "mpirun not on PATH (run scripts/install.sh)")."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"{what} [{STRICT_NOTE}]", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session", name="require")
def require_fixture():
    """`require(condition, what)` for test modules (conftest itself is not importable by name)."""
    return require


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Safety net for skips that bypass `require` (pytest.skip, importorskip): fail them too."""
    outcome = yield
    report = outcome.get_result()
    if (STRICT and report.skipped and not hasattr(report, "wasxfail")
            and call.excinfo is not None and not call.excinfo.errisinstance(RealDataAbsent)):
        reason = call.excinfo.value.msg if call.excinfo.errisinstance(Skipped) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped: {reason} [{STRICT_NOTE}]"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module skipped at import (module-level skip or importorskip) fails in strict mode."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped: {report.longrepr} [{STRICT_NOTE}]"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real Sentinel samples, EuroSAT RGB); skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        raise RealDataAbsent(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def need_mpirun() -> None:
    require(shutil.which("mpirun") is not None,
            "mpirun not on PATH (OpenMPI: run scripts/install.sh or load your MPI module)")


@pytest.fixture
def needs_mpirun() -> None:
    """For tests that start `mpirun` themselves (e.g. through slurm/tx2/launch.sh)."""
    need_mpirun()


@pytest.fixture
def needs_horovod() -> None:
    """Horovod with torch is part of the stack scripts/install.sh builds."""
    require(importlib.util.find_spec("horovod") is not None,
            "horovod is not installed (scripts/install.sh builds it with PyTorch + MPI)")


def mpirun(np_: int, args: list[str], timeout: float = 300, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Start `np_` real ranks on this machine (oversubscribed, one thread each) and wait."""
    need_mpirun()
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
