"""A DHP rank killed (SIGKILL) or frozen (SIGSTOP) mid-run: every survivor exits non-zero after
one message naming the rank, its stage and what it was doing; no hang; the last checkpoint stays
readable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dhp_helpers import dhp_cmd, write_plan, write_rgb_h5  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
TIMEOUT_S = 20


def _rank_pid(rank: int, marker: str) -> int | None:
    """PID of the process whose command line holds `marker` and whose MPI rank is `rank`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "mpirun" not in cmd and \
                f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_failed_rank_stops_every_rank_with_one_message(tmp_path: Path, sig) -> None:
    from hpcsrl.train.checkpoint import read_checkpoint

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    data = write_rgb_h5(tmp_path / "p.h5", n=60)
    plan = write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[1, 1, 1])
    out = tmp_path / "run"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np", "3",
           *dhp_cmd(plan, data, out, "--iterations", "1000", "--aggregate-every", "3",
                    "--timeout", str(TIMEOUT_S))]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 600
            while not (out / "checkpoint.pt").exists():
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, "no checkpoint after 600 s"
                time.sleep(1)
            pid = _rank_pid(1, str(out))
            assert pid is not None
            os.kill(pid, sig)
            t0 = time.monotonic()
            rc = proc.wait(timeout=TIMEOUT_S + 240)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err_path.read_text()
    print(f"{sig.name}: mpirun exited {rc} after {elapsed:.1f} s\n{text[-2000:]}")
    assert rc != 0
    assert "rank 1 (stage 1, replica 0)" in text, text
    ours = [line for line in text.splitlines() if line.startswith("hpcsrl dhp: error:")]
    assert len(ours) == 1, text
    assert " while " in ours[0], ours[0]
    ckpt = read_checkpoint(out / "checkpoint.pt")  # intact (atomic writes)
    assert ckpt["dhp"]["iteration"] % 3 == 0 and ckpt["dhp"]["iteration"] > 0
    assert _rank_pid(0, str(out)) is None and _rank_pid(2, str(out)) is None
