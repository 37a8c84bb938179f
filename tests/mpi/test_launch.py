"""The launch stack: OpenMPI + mpi4py, Horovod with torch under mpirun, and the TX2 launchers.

These prove the installation, not hpcsrl's algorithms: if one fails, every MPI feature will.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[2]
TX2 = REPO / "slurm" / "tx2"
PY = sys.executable

# Each rank writes its line to OUT_DIR/rank-N.txt (argv[1]): mpirun's stdout forwarding has been
# seen to drop a rank's last line on a loaded machine, and that is not what these tests check.
RANKS_PY = """\
import os
import sys
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
# Point to point around a ring, then a collective: both paths must work.
right, left = (rank + 1) % size, (rank - 1) % size
got = comm.sendrecv(rank, dest=right, source=left)
total = comm.allreduce(rank + 1, op=MPI.SUM)
line = (f"rank={rank} size={size} from_left={got} sum={total} "
        f"threads={os.environ.get('OMP_NUM_THREADS')} token={os.environ.get('HPCSRL_TEST_TOKEN')}")
with open(os.path.join(sys.argv[1], f"rank-{rank}.txt"), "w") as fh:
    fh.write(line + "\\n")
"""

HOROVOD_PY = """\
import os
import sys

import torch
import horovod.torch as hvd

hvd.init()
torch.set_num_threads(1)
x = torch.full((4,), float(hvd.rank() + 1))
total = hvd.allreduce(x, op=hvd.Sum)
mean = hvd.allreduce(x, op=hvd.Average)
model = torch.nn.Linear(3, 2)
torch.manual_seed(hvd.rank())
torch.nn.init.normal_(model.weight)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
w = hvd.allgather(model.weight.detach().reshape(1, -1))
line = (f"hvd rank={hvd.rank()} size={hvd.size()} mpi={hvd.mpi_enabled()} "
        f"sum={','.join(f'{v:g}' for v in total)} mean={','.join(f'{v:g}' for v in mean)} "
        f"same_weights={bool((w[0] == w[1]).all())}")
with open(os.path.join(sys.argv[1], f"rank-{hvd.rank()}.txt"), "w") as fh:
    fh.write(line + "\\n")
"""


def parse_ranks(folder: Path) -> list[dict[str, str]]:
    """The key=value fields of every rank's rank-N.txt in `folder`, sorted by rank."""
    rows = [dict(re.findall(r"(\w+)=(\S+)", path.read_text()))
            for path in folder.glob("rank-*.txt")]
    return sorted(rows, key=lambda row: int(row["rank"]))




@pytest.mark.mpi
def test_mpi4py_ranks_see_each_other(run_mpi, tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_PY)
    proc = run_mpi(2, [PY, str(script), str(tmp_path)], timeout=120)
    rows = parse_ranks(tmp_path)
    assert [(r["rank"], r["size"], r["from_left"], r["sum"]) for r in rows] == [
        ("0", "2", "1", "3"), ("1", "2", "0", "3")], proc.stdout + proc.stderr


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.usefixtures("needs_horovod")
def test_horovodrun_check_build_has_pytorch_and_mpi() -> None:
    exe = shutil.which("horovodrun") or str(Path(PY).with_name("horovodrun"))
    proc = subprocess.run([exe, "--check-build"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    checked = set(re.findall(r"\[X\] (\w+)", proc.stdout))
    assert {"PyTorch", "MPI"} <= checked, proc.stdout


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.usefixtures("needs_horovod")
def test_horovod_torch_allreduce_under_mpirun(run_mpi, tmp_path: Path) -> None:
    script = tmp_path / "hvd.py"
    script.write_text(HOROVOD_PY)
    proc = run_mpi(2, [PY, str(script), str(tmp_path)], timeout=180)
    rows = parse_ranks(tmp_path)
    assert [r["rank"] for r in rows] == ["0", "1"], proc.stdout + proc.stderr
    for row in rows:
        assert row["size"] == "2" and row["mpi"] == "True", row
        assert row["sum"] == "3,3,3,3" and row["mean"] == "1.5,1.5,1.5,1.5", row
        assert row["same_weights"] == "True", row


# ---------------------------------------------------------- TX2 launchers (mpirun --hostfile)

def launch(args: list[str], hostfile: Path | None, timeout: float = 120, **env: str
           ) -> subprocess.CompletedProcess:
    """Run a slurm/tx2 script; on this machine the 'cluster' is localhost over loopback TCP."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HPCSRL_IFACE="lo", **env)
    full_env.pop("HOSTFILE", None)
    if hostfile is not None:
        full_env["HOSTFILE"] = str(hostfile)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def localhost_hostfile(tmp_path: Path, slots: int = 2) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(f"# test cluster\nlocalhost slots={slots}   # this machine\n")
    return path


def test_tx2_launcher_explains_a_missing_or_empty_hostfile(tmp_path: Path) -> None:
    proc = launch([str(TX2 / "launch.sh"), "true"], tmp_path / "absent")
    assert proc.returncode == 2 and "absent" in proc.stderr and "hostfile" in proc.stderr
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n")
    proc = launch([str(TX2 / "launch.sh"), "true"], empty)
    assert proc.returncode == 2 and "0 slot(s)" in proc.stderr, proc.stderr
    usage = launch([str(TX2 / "run_preprocess.sh")], empty)
    assert usage.returncode == 2 and "INPUT_DIR OUTPUT.h5" in usage.stderr, usage.stderr
    usage = launch([str(TX2 / "run_pretrain.sh"), str(tmp_path / "none.h5"), "out"], empty)
    assert usage.returncode == 2 and "none.h5" in usage.stderr, usage.stderr


def test_tx2_hostfile_example_marks_placeholders() -> None:
    text = (TX2 / "hostfile.example").read_text()
    hosts = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert hosts and all("PLACEHOLDER" in line for line in hosts)
    assert {re.search(r"slots=(\d+)", line).group(1) for line in hosts} <= {"1", "2"}


@pytest.mark.mpi
@pytest.mark.usefixtures("needs_mpirun")
def test_tx2_launcher_starts_one_rank_per_slot(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_PY)
    proc = launch([str(TX2 / "launch.sh"), PY, str(script), str(tmp_path)],
                  localhost_hostfile(tmp_path), HPCSRL_TEST_TOKEN="passed-through")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = parse_ranks(tmp_path)
    assert [(r["rank"], r["size"], r["sum"]) for r in rows] == [("0", "2", "3"), ("1", "2", "3")]
    assert {r["threads"] for r in rows} == {"1"}
    assert {r["token"] for r in rows} == {"passed-through"}
    assert "2 rank(s)" in proc.stderr


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.usefixtures("needs_mpirun")
def test_tx2_launchers_preprocess_then_pretrain(tmp_path: Path) -> None:
    scenes = tmp_path / "scenes"
    subprocess.run([PY, "-m", "hpcsrl.cli.main", "synth", "--out", str(scenes), "--scenes", "2",
                    "--size", "120", "--size-spread", "0", "--classes", "3", "--seed", "2"],
                   check=True, capture_output=True, timeout=120)
    out = tmp_path / "patches.h5"
    proc = launch([str(TX2 / "run_preprocess.sh"), str(scenes), str(out), "--patch-size", "60",
                   "--no-progress"], localhost_hostfile(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with h5py.File(out) as f:
        assert f["data_super"].shape[1:] == (12, 60, 60) and f["data_super"].shape[0] > 0
        assert int(f.attrs["n_ranks"]) == 2

    run = tmp_path / "run"
    # 2 tiny scenes: a held-out split would leave no pool, so pre-train on every patch
    proc = launch([str(TX2 / "run_pretrain.sh"), str(out), str(run), "--bands", "s2",
                   "--epochs", "1", "--batch-size", "2", "--input-size", "32", "--no-progress",
                   "--pretrain-on", "all"],
                  localhost_hostfile(tmp_path, slots=1), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rank(s)" in proc.stderr
    assert (run / "checkpoint.pt").is_file() and (run / "log.csv").is_file()
