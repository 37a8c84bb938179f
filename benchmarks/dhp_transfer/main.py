"""DHP transport vs raw mpi4py: ping-pong throughput of tensors from 4 KB to 64 MB (2 ranks).

    flock /tmp/hpcsrl-bench.lock mpirun --oversubscribe --bind-to none -np 2 \
        python benchmarks/dhp_transfer/main.py [--repeats 5] [--out benchmarks/dhp_transfer/results]

For each size, `repeats` rounds alternate the two methods (so load drifts hit both alike); each
round times `iters` round trips. Raw: blocking `Send`/`Recv` of numpy buffers. Runtime: the
pipeline's `Transport.send/recv` of torch tensors into preallocated cut buffers, completed by
its polling `Waiter` (Test with back-off, spinning only while a transfer is under way), with the
environment and wait bound `hpcsrl dhp` gives its ranks, exactly as stages exchange activations
(rank 0 -> 1) and gradients (1 -> 0).
Throughput = bytes / half the round-trip time; ratio = runtime / raw (median over rounds).
Writes results/dhp_transfer.csv and .png (rank 0).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

from hpcsrl.cli.dhp import MPI_DEFAULTS

for _key, _value in MPI_DEFAULTS.items():  # the environment `hpcsrl dhp` gives its ranks
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcsrl.pipeline import transport  # noqa: E402
from hpcsrl.pipeline.coordinator import RANK_POLL_MAX_S  # noqa: E402
from hpcsrl.pipeline.cuts import TensorSpec  # noqa: E402
from hpcsrl.pipeline.transport import ACTIVATION, GRADIENT, Transport, Waiter  # noqa: E402

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def iterations_for(nbytes: int) -> int:
    return max(4, min(200, (256 << 20) // nbytes // 4))


def raw_round(comm: MPI.Comm, buf: np.ndarray, iters: int) -> float:
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        if rank == 0:
            comm.Send(buf, dest=peer, tag=1)
            comm.Recv(buf, source=peer, tag=2)
        else:
            comm.Recv(buf, source=peer, tag=1)
            comm.Send(buf, dest=peer, tag=2)
    return (time.perf_counter() - t0) / iters


def runtime_round(tr: Transport, waiter: Waiter, spec: TensorSpec, iters: int) -> float:
    comm = tr.comm
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    out = torch.ones(spec.shape, dtype=spec.dtype)
    inbox = tr.buffers([spec], slot=0)
    comm.Barrier()
    t0 = time.perf_counter()
    for mb in range(iters):
        if rank == 0:
            back = tr.recv(inbox, peer, mb, GRADIENT)  # receive posted before the send
            waiter.wait([tr.send([out], peer, mb, ACTIVATION), back], "ping")
        else:
            waiter.wait(tr.recv(inbox, peer, mb, ACTIVATION), "ping")
            waiter.wait(tr.send(inbox, peer, mb, GRADIENT), "pong")
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--max-bytes", type=int, default=SIZES[-1],
                   help="largest message (a quick check of the script: e.g. 262144)")
    p.add_argument("--no-spin", action="store_true",
                   help="ablation: waits never poll without sleeping (transfers under way sleep "
                   "with the back-off too); writes dhp_transfer_nospin.csv/.png")
    args = p.parse_args()
    if args.no_spin:
        transport.SPIN_RATE = float("inf")  # expected transfer time 0: no spin window
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        raise SystemExit("run with mpirun -np 2")
    torch.set_num_threads(1)
    tr = Transport(comm.Dup())
    waiter = Waiter("poll", max_sleep_s=RANK_POLL_MAX_S)  # as run.py sets up a rank's waits
    rows = []
    for nbytes in (s for s in SIZES if s <= args.max_bytes):
        n = nbytes // 4
        spec = TensorSpec((n,), torch.float32, False, True)
        raw_buf = np.ones(n, dtype=np.float32)
        iters = iterations_for(nbytes)
        raw, rt = [], []
        raw_round(comm, raw_buf, 2)
        runtime_round(tr, waiter, spec, 2)  # warm-up (connections, buffers)
        for _ in range(args.repeats):
            raw.append(raw_round(comm, raw_buf, iters))
            rt.append(runtime_round(tr, waiter, spec, iters))
        ratios = [r / t for r, t in zip(raw, rt, strict=True)]  # runtime throughput / raw
        rows.append({"bytes": nbytes, "iterations": iters, "repeats": args.repeats,
                     "raw_MBps": nbytes / (statistics.median(raw) / 2) / 1e6,
                     "runtime_MBps": nbytes / (statistics.median(rt) / 2) / 1e6,
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
    if comm.Get_rank() != 0:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "dhp_transfer_nospin" if args.no_spin else "dhp_transfer"
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    for r in rows:
        print(f"{r['bytes'] / 1024:>8.0f} KiB  raw {r['raw_MBps']:8.1f} MB/s  runtime "
              f"{r['runtime_MBps']:8.1f} MB/s  ratio {r['ratio_median']:.3f} "
              f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["bytes"] for r in rows]
    a.loglog(x, [r["raw_MBps"] for r in rows], "o-", label="raw mpi4py Send/Recv")
    a.loglog(x, [r["runtime_MBps"] for r in rows], "s-", label="DHP transport")
    a.set_xlabel("message bytes")
    a.set_ylabel("MB/s (bytes / half round trip)")
    a.legend()
    b.semilogx(x, [r["ratio_median"] for r in rows], "o-")
    b.fill_between(x, [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows], alpha=0.3)
    b.axhline(0.9, color="grey", ls="--", label="target 0.9 (>= 1 MB)")
    b.set_xlabel("message bytes")
    b.set_ylabel("runtime / raw throughput")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
