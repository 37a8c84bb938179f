"""Jobs through a real Slurm: `sbatch --wait`, `srun --mpi=pmix` ranks, and slurm/preprocess.sbatch.

The fast tests at the top check the config renderer and the scripts' argument handling without
daemons; the rest are marked `slurm` and `slow` and share one session-scoped cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cluster as sc
import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PREPROCESS_SBATCH = REPO / "slurm" / "preprocess.sbatch"
PRETRAIN_SBATCH = REPO / "slurm" / "pretrain.sbatch"
PY = sys.executable


def job_script(path: Path, body: str, ntasks: int = 2) -> Path:
    """A batch script with the resources every test job needs, then `body`."""
    path.write_text(f"#!/bin/bash\n#SBATCH --ntasks={ntasks}\n#SBATCH --cpus-per-task=1\n"
                    f"#SBATCH --time=00:05:00\nset -euo pipefail\n{body}\n")
    return path


def run_script(script: Path, *args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run an sbatch script with bash directly (no Slurm): only its checks before srun run."""
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})}, cwd=REPO)


# ------------------------------------------------------------------ without daemons

def test_slurm_conf_keeps_everything_under_root(tmp_path: Path) -> None:
    text = sc.render_slurm_conf(root=tmp_path, node="n1", cpus=6, memory_mb=1000,
                                ctld_port=7001, slurmd_port=7002,
                                munge_socket=tmp_path / "munge" / "sock", first_job_id=4242)
    conf = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith(
        ("NodeName", "PartitionName")))
    assert conf["SlurmdParameters"] == "config_overrides"
    assert conf["MpiDefault"] == "pmix"
    assert (conf["SlurmctldPort"], conf["SlurmdPort"]) == ("7001", "7002")
    assert conf["AuthInfo"] == f"socket={tmp_path / 'munge' / 'sock'}"
    assert conf["FirstJobId"] == "4242"
    assert 4 <= int(conf["MinJobAge"]) <= 5  # keeps `sbatch --wait` polling every 2 s
    paths = [v for k, v in conf.items() if v.startswith("/")]
    assert len(paths) >= 7 and all(p.startswith(str(tmp_path)) for p in paths), paths
    assert re.search(r"^NodeName=n1 NodeAddr=127\.0\.0\.1 CPUs=6 ", text, re.M)
    assert re.search(r"^PartitionName=\S+ Nodes=n1 Default=YES", text, re.M)


def test_free_ports_are_distinct() -> None:
    ports = sc.free_ports(3)
    assert len(set(ports)) == 3 and all(1024 < p < 65536 for p in ports)


@pytest.mark.parametrize("script", [PREPROCESS_SBATCH, PRETRAIN_SBATCH], ids=lambda p: p.name)
def test_sbatch_scripts_check_arguments(script: Path, tmp_path: Path) -> None:
    for path in (script, REPO / "slurm" / "env.sh"):
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    text = script.read_text()
    for line in ("#SBATCH --nodes=", "#SBATCH --ntasks=", "#SBATCH --time=", "#SBATCH --output=",
                 "srun --mpi=pmix --cpus-per-task="):
        assert line in text, f"{script.name} lacks {line!r}"

    usage = run_script(script)
    assert usage.returncode == 2
    assert f"slurm/{script.name}" in usage.stderr and "HPCSRL_VENV" in usage.stderr

    missing = tmp_path / "nowhere"
    bad = run_script(script, str(missing), str(tmp_path / "out"))
    assert bad.returncode == 2 and str(missing) in bad.stderr, bad.stderr

    novenv = run_script(script, str(tmp_path), str(tmp_path / "out"),
                        env={"HPCSRL_VENV": str(tmp_path / "no-venv")})
    assert novenv.returncode == 3 and "HPCSRL_VENV" in novenv.stderr, novenv.stderr


# ------------------------------------------------------------------ with a real cluster

@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_mpi4py_job(submit, tmp_path: Path) -> None:
    (tmp_path / "ranks.py").write_text(
        "import os\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
        "print(f'rank={c.Get_rank()} size={c.Get_size()} procid={os.environ[\"SLURM_PROCID\"]} '"
        "      f'pid={os.getpid()} sum={c.allreduce(c.Get_rank() + 1)}', flush=True)\n")
    script = job_script(tmp_path / "mpi.sbatch", f"srun --mpi=pmix {PY} ranks.py")
    job = submit(script)
    assert job.result.returncode == 0, job.report()
    lines = sorted(re.findall(r"rank=(\d) size=(\d) procid=(\d) pid=(\d+) sum=(\d+)", job.output))
    ranks = [(rank, size, procid) for rank, size, procid, _, _ in lines]
    assert ranks == [("0", "2", "0"), ("1", "2", "1")], job.report()
    assert {total for *_, total in lines} == {"3"}, job.report()
    assert len({pid for *_, pid, _ in lines}) == 2, job.report()


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_wait_returns_the_job_exit_code(submit, tmp_path: Path) -> None:
    script = job_script(tmp_path / "fail.sbatch", "echo about-to-fail\nexit 7", ntasks=1)
    job = submit(script)
    assert job.result.returncode == 7, job.report()
    assert "about-to-fail" in job.output, job.report()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_that_never_starts_times_out_and_is_cancelled(slurm_cluster) -> None:
    with pytest.raises(sc.SlurmClusterError, match="did not finish within 3 s") as info:
        slurm_cluster.sbatch(["--begin=now+3600", "--output=/dev/null", "--wrap", "true"],
                             timeout=3)
    assert "slurmctld.log" in str(info.value)  # the diagnostics come with the error
    queue = slurm_cluster.command(["squeue", "-h", "-t", "PD,R", "-o", "%i"]).stdout.split()
    assert queue == []


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("needs_horovod")
def test_horovod_allreduce_under_srun(submit, tmp_path: Path) -> None:
    (tmp_path / "hvd.py").write_text(
        "import torch\nimport horovod.torch as hvd\nhvd.init()\n"
        "t = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)\n"
        "print(f'hvd rank={hvd.rank()} size={hvd.size()} sum={t.item():g}', flush=True)\n")
    script = job_script(tmp_path / "hvd.sbatch", f"srun --mpi=pmix {PY} hvd.py")
    job = submit(script, timeout=150)
    assert job.result.returncode == 0, job.report()
    found = sorted(re.findall(r"hvd rank=(\d) size=(\d) sum=(\S+)", job.output))
    assert found == [("0", "2", "3"), ("1", "2", "3")], job.report()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic S1+S2 scenes of different sizes."""
    out = tmp_path_factory.mktemp("scenes")
    subprocess.run([PY, "-m", "hpcsrl.cli.main", "synth", "--out", str(out), "--scenes", "3",
                    "--size", "150", "--size-spread", "0.3", "--classes", "3", "--seed", "5"],
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def reference_h5(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same scenes preprocessed by one plain process (no Slurm, no mpirun)."""
    out = tmp_path_factory.mktemp("reference") / "reference.h5"
    subprocess.run([str(Path(PY).with_name("hpcsrl-preprocess")), "--input", str(scenes),
                    "--output", str(out), "--patch-size", "60", "--no-progress"],
                   check=True, capture_output=True, timeout=150,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_preprocess_sbatch_writes_the_same_hdf5_as_one_process(
        submit, tmp_path: Path, scenes: Path, reference_h5: Path) -> None:
    job = submit(PREPROCESS_SBATCH, str(scenes), "out/patches.h5", "--patch-size", "60",
                 timeout=150)
    assert job.result.returncode == 0, job.report()
    assert "preprocessing exited with code 0" in job.output, job.report()
    with h5py.File(tmp_path / "out" / "patches.h5") as got, h5py.File(reference_h5) as ref:
        n = got["data_10m"].shape[0]
        assert n > 0, job.report()
        assert int(got.attrs["n_ranks"]) == 2
        assert int(got.attrs["patch_size"]) == 60
        expected_shapes = {"data_10m": (n, 4, 60, 60), "data_20m": (n, 6, 30, 30),
                           "data_60m": (n, 2, 10, 10), "data_super": (n, 12, 60, 60),
                           "s1": (n, 2, 60, 60), "label": (n,)}
        for name, shape in expected_shapes.items():
            assert got[name].shape == shape, name
        assert got["classes"].shape == (n, 3)
        assert set(got) == set(ref)
        for name in ref:
            np.testing.assert_array_equal(got[name][()], ref[name][()], err_msg=name)


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_sbatch_runs_one_epoch(submit, tmp_path: Path, reference_h5: Path) -> None:
    job = submit(PRETRAIN_SBATCH, str(reference_h5), "run", "--bands", "s2", "--epochs", "1",
                 "--batch-size", "2", "--input-size", "32", "--no-progress",
                 sbatch=["--cpus-per-task=2"], timeout=240)
    assert job.result.returncode == 0, job.report()
    assert "1 rank(s)" in job.output and "2 thread(s)" in job.output, job.report()
    assert "pre-training exited with code 0" in job.output, job.report()
    assert (tmp_path / "run" / "checkpoint.pt").is_file(), job.report()
    rows = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 2, rows  # header + one epoch


@pytest.mark.slurm
@pytest.mark.slow
def test_preprocess_sbatch_fails_cleanly_on_empty_input(submit, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    job = submit(PREPROCESS_SBATCH, "empty", "out/patches.h5", "--patch-size", "60")
    assert job.result.returncode not in (0, None), job.report()
    assert "preprocessing exited with code" in job.output, job.report()
    assert "Traceback" not in job.output, job.report()
    assert not (tmp_path / "out" / "patches.h5").exists()


# ------------------------------------------------------------------ data-parallel jobs (Horovod)

HOROVOD_SBATCH = REPO / "slurm" / "horovod_dp.sbatch"
SCALING_SBATCH = REPO / "slurm" / "scaling.sbatch"


def _rgb_h5(path: Path, n: int = 48) -> Path:
    """A small labelled RGB patch file (the unit tests' writer)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_pretrain import _write_rgb_h5

    return _write_rgb_h5(path, n=n)


def test_horovod_sbatch_scripts_check_arguments(tmp_path: Path) -> None:
    for script in (HOROVOD_SBATCH, SCALING_SBATCH):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert "srun --mpi=pmix --cpus-per-task=" in script.read_text()
        usage = run_script(script)
        assert usage.returncode == 2 and f"slurm/{script.name}" in usage.stderr
    bad = run_script(HOROVOD_SBATCH, "fit", str(tmp_path), str(tmp_path / "out"))
    assert bad.returncode == 2 and "'pretrain' or 'train'" in bad.stderr, bad.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("needs_horovod")
def test_horovod_dp_sbatch_pretrains_then_trains_on_two_ranks(submit, tmp_path: Path) -> None:
    data = _rgb_h5(tmp_path / "rgb.h5")
    job = submit(HOROVOD_SBATCH, "pretrain", str(data), "pre", "--bands", "rgb", "--epochs", "1",
                 "--batch-size", "8", "--input-size", "32", "--no-progress",
                 "--monitor-samples", "0", "--precise-bn", "16", "--pretrain-on", "all",
                 timeout=400)
    assert job.result.returncode == 0, job.report()
    # --cpus-per-task 1 on 2 tasks fills the CPUs: the default backend is the MPI ring
    assert "over 2 rank(s)" in job.output and "(2 ranks x 4, mpi)" in job.output, job.report()
    assert "pretrain exited with code 0" in job.output, job.report()
    import torch

    assert torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)["ranks"] == 2
    job = submit(HOROVOD_SBATCH, "train", str(data), "cls", "--bands", "rgb", "--backbone",
                 "resnet18", "--epochs", "1", "--batch-size", "8", "--no-progress",
                 "--init", "pre/checkpoint.pt", "--data-parallel", "horovod", timeout=400)
    assert job.result.returncode == 0, job.report()
    assert "(2 ranks, horovod)" in job.output and "test F1 micro" in job.output, job.report()
    assert (tmp_path / "cls" / "test_f1.csv").is_file(), job.report()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("needs_horovod")
def test_scaling_sbatch_measures_one_point(submit, tmp_path: Path) -> None:
    job = submit(SCALING_SBATCH, "res", "--micro-batch", "4", "--steps", "1", "--warmup", "0",
                 timeout=400)
    assert job.result.returncode == 0, job.report()
    assert "2 rank(s)" in job.output and "1 thread(s)" in job.output, job.report()
    import json

    (result,) = (tmp_path / "res").glob("scaling-2x1-*.json")
    point = json.loads(result.read_text())
    assert point["ranks"] == 2 and point["global_batch"] == 8, point
    # 2 tasks x 1 CPU fill their CPUs: the default backend is the MPI ring (the point says so)
    assert point["backend"] == "mpi", point
    assert point["allreduce_ring_s"] > 0 and point["allreduce_ring_model_s"] > 0, point
