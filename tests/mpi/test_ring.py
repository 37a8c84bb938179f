"""The ring-allreduce of the MPI data-parallel backend, on 2 and 3 real ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("ranks", [2, 3])
def test_ring_allreduce_sums_and_leaves_every_rank_bit_identical(run_mpi, ranks: int) -> None:
    proc = run_mpi(ranks, [sys.executable, str(HERE / "ring_check.py")], timeout=120)
    assert proc.stdout.count("ok ") == 12, proc.stdout
