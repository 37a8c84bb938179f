"""One measurement of data-parallel pre-training, run under `mpirun -np K` by main.py.

Times the project's own training step (`Pretrainer.step` with Horovod's DistributedOptimizer):
synthetic mode repeats one fixed pair of views (no I/O, like Horovod's synthetic benchmark); real
mode runs `Pretrainer.train_epoch` on an HDF5 (reads, augmentations, step). Afterwards, on the
same ranks: the gradient allreduce timed alone (Horovod and raw MPI) and the link bandwidth B
from a ping-pong of the same S bytes, for the ring model 2(k-1)/k * S / B. Rank 0 writes JSON.

Bytes sent per rank are not counted here: OpenMPI's PML monitoring component counts every byte
each rank hands to the transport (shared memory included) and main.py reads its output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI  # first: MPI initialised once, MPI_THREAD_MULTIPLE, before Horovod

from hpcsrl.parallel.ring import ring_allreduce
from hpcsrl.parallel.select import BACKENDS, make_distribution
from hpcsrl.train.distribution import SingleProcess
from hpcsrl.train.loop import PretrainConfig, Pretrainer


class RandomPatches:
    """Random in-memory patches with the dataset API the trainer reads (synthetic mode)."""

    def __init__(self, n: int, size: int, channels: int = 3) -> None:
        self.x = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
        self.channels, self.patch_size = channels, size
        self.band_names, self.sensor = ("B04", "B03", "B02")[:channels], "optical"
        self.labels, self.has_labels = np.full(n, -1), False

    def __len__(self) -> int:
        return len(self.x)

    def read_batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[np.asarray(idx)], torch.full((len(idx),), -1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--data", default=None)
    p.add_argument("--bands", default="rgb")
    p.add_argument("--micro-batch", type=int, default=64, help="per rank and backward pass")
    p.add_argument("--batches-per-allreduce", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--method", default="lite-srl")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--fp16-allreduce", action="store_true")
    p.add_argument("--independent", action="store_true",
                   help="control: every rank trains its own model alone (no Horovod, no "
                   "allreduce), to see what the machine gives K processes at that moment")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="data-parallel backend, as `hpcsrl pretrain --data-parallel`")
    p.add_argument("--groups", default="auto",
                   help="Horovod allreduce groups: 0 per tensor, overlapping backward; 1 one "
                   "grouped allreduce after backward; auto (default) as hpcsrl decides")
    p.add_argument("--out", required=True)
    return p.parse_args()


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, ranks aligned by a barrier before each."""
    times = []
    for _ in range(repeats):
        MPI.COMM_WORLD.Barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def breakdown(trainer: Pretrainer, x_a: torch.Tensor, x_b: torch.Tensor, steps: int,
              comm: MPI.Comm) -> dict[str, float]:
    """Where a step's time goes (medians, mean over ranks): forward + backward (gradient
    allreduces start from its hooks and overlap it), and the optimiser step, which first waits
    for the allreduces still running."""
    compute, wait = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.opt.zero_grad()
        trainer.model(x_a, x_b).backward()
        t1 = time.perf_counter()
        trainer.opt.step()
        compute.append(t1 - t0)
        wait.append(time.perf_counter() - t1)
    k = comm.Get_size()
    return {"compute_s": comm.allreduce(statistics.median(compute)) / k,
            "optimizer_step_s": comm.allreduce(statistics.median(wait)) / k}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    comm = MPI.COMM_WORLD
    k = comm.Get_size()
    if args.independent and args.mode != "synthetic":
        sys.exit("worker.py: --independent needs --mode synthetic")
    parallel = k > 1 and not args.independent
    groups = args.groups if args.groups == "auto" else int(args.groups)
    dist = make_distribution(fp16_allreduce=args.fp16_allreduce, backend=args.backend,
                             groups=groups) if parallel else SingleProcess()
    backend = dist.describe()["kind"]  # single, mpi or horovod
    per_step = args.micro_batch * args.batches_per_allreduce
    batch = per_step * k
    if args.mode == "synthetic":
        ds = RandomPatches(max(2 * batch, 8), args.input_size)
    else:
        from hpcsrl.data import PatchDataset
        ds = PatchDataset(args.data, bands=args.bands)
    limit = batch * (args.steps + args.warmup) if args.mode == "real" else None
    cfg = PretrainConfig(method=args.method, backbone=args.backbone, bands=args.bands, epochs=1,
                         batch_size=batch, input_size=args.input_size, monitor_samples=0,
                         progress=False, precise_bn=0, limit=limit, lr=0.01,
                         batches_per_allreduce=args.batches_per_allreduce, in_memory=False)
    out_dir = Path(tempfile.mkdtemp(prefix="hpcsrl-scaling-"))
    trainer = Pretrainer(ds, cfg, out_dir, dist=dist)
    trainer.model.train()
    result: dict = {"ranks": k, "mode": args.mode, "backend": backend,
                    "micro_batch": args.micro_batch,
                    "batches_per_allreduce": args.batches_per_allreduce, "global_batch": batch,
                    "fp16_allreduce": args.fp16_allreduce}
    if args.mode == "synthetic":
        x = ds.read_batch(np.arange(per_step))[0]
        x_a, x_b = trainer.views(x, torch.Generator().manual_seed(comm.Get_rank()))
        for _ in range(args.warmup):
            trainer.step(x_a, x_b)

        def steps() -> None:
            for _ in range(args.steps):
                trainer.step(x_a, x_b)

        step_s = timed(steps, 1) / args.steps  # no barrier between steps, as in training
        optimizer_steps = args.warmup + args.steps
        if args.batches_per_allreduce == 1:
            result.update(breakdown(trainer, x_a, x_b, args.steps, comm))
            optimizer_steps += args.steps
        result["optimizer_steps"] = optimizer_steps
    else:
        _, images, seconds, _ = trainer.train_epoch(0)
        step_s = seconds / trainer.steps_per_epoch
        result["optimizer_steps"] = trainer.steps_per_epoch
        result["epoch_images"] = images
    step_s = comm.allreduce(step_s, op=MPI.MAX)
    result.update(step_s=step_s, images_per_s=batch / step_s)
    if backend == "horovod":
        result["allreduce_groups"] = dist.groups  # "auto" resolved by wrap_optimizer

    grads = [p for p in trainer.model.parameters() if p.requires_grad]
    n_elem = sum(p.numel() for p in grads)
    s_bytes = 4 * n_elem
    result.update(parameters=n_elem, gradient_bytes=s_bytes)
    if parallel:
        if backend == "horovod":
            import horovod.torch as hvd

            buf = torch.ones(n_elem)
            result["allreduce_horovod_s"] = timed(
                lambda: hvd.allreduce(buf, op=hvd.Average, name="bench.allreduce"), 5)
        flat = np.ones(n_elem, np.float32)
        recv = np.empty_like(flat)
        result["allreduce_mpi_s"] = timed(lambda: comm.Allreduce(flat, recv), 5)
        result["allreduce_ring_s"] = timed(lambda: ring_allreduce(comm, flat), 5)
        # Ping-pong of S bytes between ranks 0 and 1: B = 2 S / round trip.
        rank = comm.Get_rank()

        def pingpong() -> None:
            if rank == 0:
                comm.Send(flat, dest=1)
                comm.Recv(recv, source=1)
            elif rank == 1:
                comm.Recv(recv, source=0)
                comm.Send(flat, dest=0)

        rt = timed(pingpong, 5)
        bandwidth = 2 * s_bytes / rt
        bandwidth = comm.bcast(bandwidth, root=0)
        result.update(bandwidth_Bps=bandwidth,
                      allreduce_ring_model_s=2 * (k - 1) / k * s_bytes / bandwidth)
    trainer.lock.release()
    if comm.Get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    comm.Barrier()


if __name__ == "__main__":
    sys.exit(main())
