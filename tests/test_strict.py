"""Strict mode: under CI (and `make test`) a missing MPI stack fails the run instead of skipping.

A fresh pytest runs tiny tests against a copy of tests/conftest.py with mpirun taken off PATH,
so this proves what a machine whose install lost OpenMPI would show.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TINY_TESTS = '''
import pytest


def test_needs_mpi(run_mpi):
    run_mpi(2, ["true"])


def test_plain_skip():
    pytest.skip("some stack is missing")


def test_real_data(shared_data):
    pass
'''


def path_without_mpirun() -> str:
    """PATH minus every folder that holds mpirun (as after a broken OpenMPI install)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in folders
                           if d and not (Path(d) / "mpirun").exists())


def run_tiny_suite(tmp_path: Path, **env: str) -> dict[str, str]:
    """Outcome per tiny test (PASSED, FAILED, ERROR, SKIPPED) of a pytest run in a subprocess,
    plus its exit code and output."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "HPCSRL_STRICT")}
    full_env.update(PATH=path_without_mpirun(), HPCSRL_SHARED_DATA=str(tmp_path / "absent"),
                    **env)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                           "-o", "addopts=", str(tmp_path / "test_tiny.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=full_env)
    outcomes = dict(re.findall(r"test_tiny\.py::(test_\w+) (PASSED|FAILED|ERROR|SKIPPED)",
                               proc.stdout))
    outcomes["exit"] = str(proc.returncode)
    outcomes["output"] = proc.stdout + proc.stderr
    return outcomes


def test_the_tiny_suite_really_lacks_mpirun():
    assert shutil.which("mpirun", path=path_without_mpirun()) is None


@pytest.mark.parametrize("strict_env", [{"CI": "true"}, {"HPCSRL_STRICT": "1"}],
                         ids=["CI=true", "HPCSRL_STRICT=1"])
def test_missing_mpirun_fails_under_ci_and_only_real_data_skips(tmp_path, strict_env):
    got = run_tiny_suite(tmp_path, **strict_env)
    assert got.get("test_needs_mpi") == "FAILED", got["output"]
    assert "mpirun not on PATH" in got["output"] and "strict mode" in got["output"]
    assert got.get("test_plain_skip") == "FAILED", got["output"]  # the safety net for bare skips
    assert got.get("test_real_data") == "SKIPPED", got["output"]
    assert got["exit"] == "1", got["output"]


def test_missing_mpirun_skips_on_a_developer_machine(tmp_path):
    got = run_tiny_suite(tmp_path)
    assert got.get("test_needs_mpi") == "SKIPPED", got["output"]
    assert got.get("test_plain_skip") == "SKIPPED", got["output"]
    assert got.get("test_real_data") == "SKIPPED", got["output"]
    assert got["exit"] == "0", got["output"]
