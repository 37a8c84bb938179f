"""Rank-aware logging: only rank 0 speaks unless HPCSRL_LOG_ALL_RANKS=1 asks otherwise."""

from __future__ import annotations

import logging
import os
import sys

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "HOROVOD_RANK")


def launcher_rank() -> int:
    """This process's rank as set by mpirun/srun/horovodrun, read without importing MPI."""
    for var in _RANK_VARS:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                continue
    return 0


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest and tqdm swap it), not the one at set-up."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger(name: str = "hpcsrl", rank: int | None = None) -> logging.Logger:
    """A logger that is silent on ranks other than 0 (unless HPCSRL_LOG_ALL_RANKS=1)."""
    rank = launcher_rank() if rank is None else rank
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _CurrentStderr()
        prefix = f"[rank {rank}] " if os.environ.get("HPCSRL_LOG_ALL_RANKS") == "1" else ""
        handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    all_ranks = os.environ.get("HPCSRL_LOG_ALL_RANKS") == "1"
    logger.setLevel(logging.INFO if (rank == 0 or all_ranks) else logging.ERROR)
    return logger
