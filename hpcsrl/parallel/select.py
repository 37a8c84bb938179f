"""Which distribution a training command runs: one process alone, or data parallelism over the
launcher's ranks with one of two interchangeable backends.

- `mpi` (`mpi_data_parallel.MPIDistribution`): the training thread ring-allreduces one flat
  gradient buffer after backward; nothing else runs beside the compute.
- `horovod` (`horovod.HorovodDistribution`): Horovod's DistributedOptimizer, whose background
  thread overlaps the allreduces with backward.
- `auto` (default): `mpi` when the node's ranks x compute threads fill its usable cores (there is
  no spare core for Horovod's thread to overlap on, and its polling slows the compute: measured in
  benchmarks/scaling), else `horovod`.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "mpi", "horovod")
# Launcher variables that give the number of ranks (mpirun, srun job step, horovodrun).
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "HOROVOD_SIZE")


def launched_ranks() -> int:
    """How many ranks the launcher started (1 when run directly), read without initialising MPI."""
    for var in SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:  # inside `srun`
        value = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "1")
        return int(value) if value.isdigit() else 1
    return 1


def cores_filled(local_ranks: int, threads: int, cores: int) -> bool:
    """Whether the node's ranks x compute threads use all its cores (no spare core to overlap
    communication on)."""
    return local_ranks * threads >= cores


def node_ranks() -> int:
    """Ranks of this job on this node (initialises MPI, which every backend needs anyway)."""
    from mpi4py import MPI

    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def resolve_backend(backend: str) -> str:
    """`auto` -> `mpi` or `horovod` for this node (set the compute threads first)."""
    if backend != "auto":
        return backend
    import torch

    filled = cores_filled(node_ranks(), torch.get_num_threads(), len(os.sched_getaffinity(0)))
    return "mpi" if filled else "horovod"


def make_distribution(sync_bn: bool = False, fp16_allreduce: bool = False,
                      backend: str = "auto", groups: int | str = "auto"):
    """The single process when the launcher started one rank (unchanged), else data parallelism
    with `backend` (one of BACKENDS; `groups`: Horovod's allreduce groups, see
    `HorovodDistribution`)."""
    from hpcsrl.train.distribution import SingleProcess

    if launched_ranks() <= 1:
        return SingleProcess()
    if resolve_backend(backend) == "mpi":
        from hpcsrl.parallel.mpi_data_parallel import MPIDistribution

        return MPIDistribution(sync_bn=sync_bn, fp16_allreduce=fp16_allreduce)
    from hpcsrl.parallel.horovod import HorovodDistribution

    return HorovodDistribution(sync_bn=sync_bn, fp16_allreduce=fp16_allreduce, groups=groups)
