"""Data-parallel pre-training under `mpirun -np 2` (MPI and Horovod backends): exact equality
with one process on the union of the ranks' batches, kill + --resume equals an uninterrupted run,
and bad input stops every rank with one line from rank 0."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the fixtures of test_pretrain
sys.path.insert(0, str(HERE))

from horovod_steps import EXACT_CFG  # noqa: E402
from test_pretrain import TensorPatches, _write_rgb_h5  # noqa: E402

from hpcsrl.precision import native_bf16  # noqa: E402
from hpcsrl.procs import ended_on_this_host  # noqa: E402
from hpcsrl.train.batches import view_generator  # noqa: E402
from hpcsrl.train.loop import PretrainConfig, Pretrainer  # noqa: E402

PY = sys.executable
CLI = [PY, "-m", "hpcsrl.cli.main"]
pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("needs_horovod")]


def _union_reference(tmp_path: Path, steps: int, ranks: int, batch_stats: bool = False
                     ) -> dict[str, torch.Tensor]:
    """One process, same options, each step on the concatenation of the ranks' views."""
    trainer = Pretrainer(TensorPatches(n=40), PretrainConfig(**EXACT_CFG), tmp_path / "ref")
    trainer.model.double().train(batch_stats)
    cfg = trainer.cfg
    for i, batch in enumerate(trainer.my_batches(0)[:steps]):
        x = trainer.ds.read_batch(batch)[0]
        per = len(batch) // ranks
        views = [trainer.views(x[r * per:(r + 1) * per], view_generator(cfg.seed, 0, i, r))
                 for r in range(ranks)]
        trainer.step(torch.cat([a for a, _ in views]).double(),
                     torch.cat([b for _, b in views]).double())
        trainer.sched.step()
    trainer.lock.release()
    return trainer.model.state_dict()


@pytest.mark.parametrize("backend,k,sync_bn", [
    ("horovod", 1, False), ("horovod", 2, False), ("horovod", 1, True), ("mpi", 1, False),
    ("mpi", 2, False), ("mpi", 1, True)],
    ids=["horovod-eval-bn", "horovod-gloo-2-passes", "horovod-sync-bn", "mpi-eval-bn",
         "mpi-2-passes", "mpi-sync-bn"])
def test_two_ranks_equal_one_process_on_the_union(run_mpi, tmp_path: Path, backend: str, k: int,
                                                   sync_bn: bool) -> None:
    """Parameters and buffers after 4 steps agree to 1e-5 with one process on the union of the
    ranks' views; both ranks hold identical values, with either backend. 2-passes: 2 backward
    passes per allreduce (the same gradient, summed from micro-batches). sync-bn: BatchNorm in
    training mode with statistics over both ranks = one process's over the union (running
    statistics included)."""
    steps = 4
    gloo = (backend, k, sync_bn) == ("horovod", 2, False)
    run_mpi(2, [PY, str(HERE / "horovod_steps.py"), str(tmp_path), str(steps),
                "--batches-per-allreduce", str(k), "--backend", backend,
                *(["--sync-bn"] if sync_bn else [])],
            timeout=400, env={"HOROVOD_CONTROLLER": "gloo"} if gloo else None)
    r0 = torch.load(tmp_path / "rank-0.pt")
    r1 = torch.load(tmp_path / "rank-1.pt")
    described = json.loads((tmp_path / "rank-0.json").read_text())
    assert described["kind"] == backend
    if backend == "horovod":
        # Gloo is started by hpcsrl's rendezvous: equal results prove it spans both ranks
        # (a rendezvous-less Gloo would run each rank alone)
        assert described["controller"] == ("gloo" if gloo else "mpi")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    ref = _union_reference(tmp_path, steps, ranks=2, batch_stats=sync_bn)
    # a single step moves the weights far more than the tolerance: the comparison has teeth
    start = Pretrainer(TensorPatches(n=40), PretrainConfig(**EXACT_CFG), tmp_path / "start")
    start.lock.release()
    moved = max((start.model.state_dict()[n].double() - ref[n]).abs().max().item()
                for n in ref if ref[n].is_floating_point())
    diff = max((r0[n] - ref[n]).abs().max().item() for n in ref if ref[n].is_floating_point())
    print(f"max |2 ranks - union| {diff:.2e}; one step moves the weights by {moved:.2e}")
    assert moved > 1e-3 and diff <= 1e-5, (moved, diff)


def _pretrain_args(data: Path, out: Path, epochs: int) -> list[str]:
    return [*CLI, "pretrain", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "8", "--input-size", "32", "--no-progress", "--monitor-samples", "0",
            "--precise-bn", "32", "--pretrain-on", "all", "--warmup-epochs", "1"]


def _mpirun_cmd(np_: int, args: list[str]) -> list[str]:
    return ["mpirun", "--oversubscribe", "--bind-to", "none", "--map-by", "slot", "-np",
            str(np_), *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMP_NUM_THREADS="1")


def _epochs_logged(out: Path) -> int:
    try:
        with open(out / "log.csv") as f:
            return len(list(csv.DictReader(f)))
    except OSError:
        return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL mpirun and every rank (a lost node), and wait until they have all ended.

    Open MPI starts each rank in its own process group, so killing mpirun's group leaves the ranks
    running (they would still hold the output folder's lock)."""
    pids = [*_descendants(proc.pid), proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while not all(ended_on_this_host(socket.gethostname(), pid) for pid in pids):
        assert time.time() < deadline, "killed ranks still running after 60 s"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(run_mpi, tmp_path: Path) -> None:
    data = _write_rgb_h5(tmp_path / "d.h5", n=96)
    full = run_mpi(2, _pretrain_args(data, tmp_path / "full", 3), timeout=600)
    assert "2 ranks x 4" in full.stderr, full.stderr
    assert _epochs_logged(tmp_path / "full") == 3

    part = tmp_path / "part"
    proc = subprocess.Popen(_mpirun_cmd(2, _pretrain_args(data, part, 3)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 500
        while _epochs_logged(part) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert _epochs_logged(part) == 1, proc.communicate(timeout=60)
    finally:
        _kill_job(proc)  # mid epoch 2
    assert _epochs_logged(part) == 1  # killed before epoch 2 ended
    resumed = run_mpi(2, [*_pretrain_args(data, part, 3), "--resume"], timeout=600)
    assert "resumed" in resumed.stderr and "after epoch 1 of 3" in resumed.stderr
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["ranks"] == b["ranks"] == 2 and b["epoch"] == 3
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_bad_input_stops_every_rank_with_one_line(run_mpi, tmp_path: Path, backend: str) -> None:
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unlabelled = _write_rgb_h5(tmp_path / "unlabelled.h5", n=48)
    with h5py.File(unlabelled, "a") as f:
        del f["classes"]
    common = ["--epochs", "1", "--batch-size", "8", "--input-size", "32", "--no-progress",
              "--monitor-samples", "0", "--pretrain-on", "all", "--data-parallel", backend]
    cases = {
        "ranks": ["pretrain", "--data", str(data), "--limit", "2", "--out",
                  str(tmp_path / "o1"), *common],
        "key": ["pretrain", "--data", str(data), "--bands", "s2", "--out",
                str(tmp_path / "o2"), *common],
        "out": ["pretrain", "--data", str(data), "--out", str(blocker / "run"), *common],
        "classes": ["train", "--data", str(unlabelled), "--bands", "rgb", "--out",
                    str(tmp_path / "o4"), "--epochs", "1", "--batch-size", "12",
                    "--data-parallel", backend],
    }
    argv = []
    for name, args in cases.items():
        argv += [name, "--", *args, "---"]
    # 3 ranks (oversubscribed): more ranks than the 2 patches of --limit 2
    proc = run_mpi(3, ["--tag-output", PY, str(HERE / "horovod_bad_input.py"), str(tmp_path),
                       *argv], timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr  # the driver itself ends normally
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    for rank in (0, 1, 2):
        rcs = dict(line.split() for line in (tmp_path / f"rc-{rank}.txt").read_text().splitlines())
        assert set(rcs) == set(cases) and all(rc != "0" for rc in rcs.values()), (rank, rcs)
    errors = re.findall(r"^\[1,(\d)\]<stderr>:(hpcsrl \w+: error: .*)$", text, re.M)
    assert [rank for rank, _ in errors] == ["0"] * len(cases), errors
    said = dict(zip(cases, (line for _, line in errors), strict=True))
    assert "3 ranks need at least 6 training patches" in said["ranks"], said
    assert "data_super" in said["key"], said
    assert str(blocker) in said["out"], said
    assert "no `classes` dataset" in said["classes"], said


@pytest.mark.slow
def test_a_failure_on_rank_0_only_ends_every_process_non_zero(run_mpi, tmp_path: Path) -> None:
    """Real process exit codes: the output folder is refused on rank 0 alone (it writes)."""
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    wrapper = ('"$@"; echo $? > "' + str(tmp_path) + '/exit-$OMPI_COMM_WORLD_RANK"')
    proc = run_mpi(2, ["sh", "-c", wrapper, "sh", *CLI, "pretrain", "--data", str(data),
                       "--out", str(blocker / "run"), "--pretrain-on", "all", "--no-progress"],
                   timeout=300, check=False)
    codes = [(tmp_path / f"exit-{r}").read_text().strip() for r in (0, 1)]
    assert codes == ["2", "2"], (codes, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(blocker) in errors[0], proc.stderr


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_under_two_ranks_then_train_inits_from_it(
        run_mpi, tmp_path: Path) -> None:
    """A single-process run killed after epoch 1 continues under 2 ranks on its own schedule
    (no warm-up, no Nesterov: the checkpoint's), then `hpcsrl train` on 2 ranks starts from it."""
    data = _write_rgb_h5(tmp_path / "d.h5", n=96)
    out = tmp_path / "pre"
    args = [a for a in _pretrain_args(data, out, 2) if a not in ("--warmup-epochs", "1")]
    proc = subprocess.Popen([*args, "--threads", "1"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while _epochs_logged(out) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert _epochs_logged(out) == 1
    resumed = run_mpi(2, [*args, "--resume"], timeout=600)
    assert "after epoch 1 of 2 (written by 1 rank(s))" in resumed.stderr, resumed.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["ranks"] == 2
    assert ckpt["pretrain"]["warmup_epochs"] == 0 and ckpt["pretrain"]["nesterov"] is False

    trained = run_mpi(2, [*CLI, "train", "--data", str(data), "--bands", "rgb", "--backbone",
                          "resnet18", "--epochs", "1", "--batch-size", "8", "--no-progress",
                          "--out", str(tmp_path / "cls"), "--init", str(out / "checkpoint.pt")],
                      timeout=600)
    assert "(2 ranks, mpi)" in trained.stderr and "test F1 micro" in trained.stderr, trained.stderr
    assert (tmp_path / "cls" / "test_f1.csv").is_file()


@pytest.mark.skipif(not native_bf16(), reason="CPU without native bfloat16")
@pytest.mark.parametrize("backend", ["mpi", "horovod"])
def test_bf16_with_sync_bn_on_two_ranks(run_mpi, tmp_path: Path, backend: str) -> None:
    """bf16 autocast under data parallelism: gradients and the SyncBatchNorm statistics are
    allreduced in fp32 (bf16 activations are summed in fp32 first), the checkpoint is fp32."""
    data = _write_rgb_h5(tmp_path / "d.h5", n=48)
    out = tmp_path / "bf16"
    done = run_mpi(2, [*_pretrain_args(data, out, 2), "--precision", "bf16", "--sync-bn",
                       "--data-parallel", backend], timeout=600)
    assert f"(2 ranks x 4, {backend})" in done.stderr, done.stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["pretrain"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())
    with open(out / "log.csv") as f:
        assert all(float(r["loss"]) == float(r["loss"]) for r in csv.DictReader(f))  # not NaN
