"""Run under `mpirun -np K`: `ring_allreduce` on arrays of awkward lengths against the sum of
every rank's array computed locally (each rank can regenerate the others' from their seeds).
Prints one `ok` line per case on rank 0; an assertion ends the job non-zero."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpcsrl.parallel.ring import ring_allreduce


def data(rank: int, n: int, dtype: type) -> np.ndarray:
    return np.random.default_rng(1000 * rank + n).standard_normal(n).astype(dtype)


def main() -> None:
    comm = MPI.COMM_WORLD
    k, rank = comm.Get_size(), comm.Get_rank()
    for n in (1, k - 1, 7, 100_003):  # fewer elements than ranks, uneven chunks, large
        for dtype, wire in ((np.float64, None), (np.float32, None), (np.float32, np.float16)):
            buf = data(rank, n, dtype)
            ring_allreduce(comm, buf, wire)
            expected = sum(data(r, n, np.float64) for r in range(k))
            tol = 1e-12 if dtype == np.float64 else (1e-5 if wire is None else 2e-2 * k)
            assert np.allclose(buf, expected, atol=tol, rtol=0), (n, dtype, wire)
            everyone = comm.allgather(buf.tobytes())
            assert all(b == everyone[0] for b in everyone), "ranks differ"  # bit-identical
            if rank == 0:
                print(f"ok n={n} {np.dtype(dtype).name} wire={wire and np.dtype(wire).name}")


if __name__ == "__main__":
    main()
