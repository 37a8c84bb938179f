"""Momentum methods under `mpirun -np 2` (both data-parallel backends): MoCo-v2's queue enqueues
the keys of every rank, so both replicas hold the same queue; the momentum encoders of MoCo-v2 and
BYOL, updated from identical online parameters, stay identical across ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from horovod_momentum_steps import GLOBAL_BATCH, QUEUE  # noqa: E402

PY = sys.executable
pytestmark = [pytest.mark.mpi, pytest.mark.usefixtures("needs_horovod")]


def _run(run_mpi, tmp_path: Path, method: str, steps: int, k: int,
         backend: str) -> tuple[dict, dict]:
    run_mpi(2, [PY, str(HERE / "horovod_momentum_steps.py"), str(tmp_path), method, str(steps),
                str(k), backend], timeout=400)
    return torch.load(tmp_path / "rank-0.pt"), torch.load(tmp_path / "rank-1.pt")


def _target_prefix(method: str) -> str:
    return "key." if method == "moco-v2" else "target."


@pytest.mark.parametrize("backend,k", [("horovod", 1), ("mpi", 2)],
                         ids=["horovod-1-pass", "mpi-2-passes"])
def test_moco_queue_holds_the_keys_of_both_ranks(run_mpi, tmp_path: Path, backend: str,
                                                 k: int) -> None:
    """After 3 steps the queues are equal on both ranks and hold, step by step, rank 0's keys
    then rank 1's (all micro-batches of a step with 2 backward passes per allreduce): 2 views x
    the global batch per step, not the per-rank batch."""
    steps = 3
    r0, r1 = _run(run_mpi, tmp_path, "moco-v2", steps, k, backend)
    q0, q1 = r0["state"]["queue.keys"], r1["state"]["queue.keys"]
    assert torch.equal(q0, q1)
    ptr0, ptr1 = int(r0["state"]["queue.ptr"]), int(r1["state"]["queue.ptr"])
    assert ptr0 == ptr1 == 2 * GLOBAL_BATCH * steps
    assert len(r0["local_keys"]) == len(r1["local_keys"]) == steps
    row = 0
    for mine, theirs in zip(r0["local_keys"], r1["local_keys"], strict=True):
        assert mine.shape[0] == theirs.shape[0] == GLOBAL_BATCH  # 2 views x 4 patches per rank
        assert not torch.allclose(mine, theirs)  # the ranks' keys differ: the check has teeth
        both = F.normalize(torch.cat([mine, theirs]), dim=1)
        assert torch.allclose(q0[row:row + 2 * GLOBAL_BATCH], both, atol=1e-6)
        row += 2 * GLOBAL_BATCH
    # the rest of the ring is still the (broadcast, identical) initial queue
    assert torch.equal(q0[row:QUEUE], r0["start"]["queue.keys"][row:QUEUE])


@pytest.mark.parametrize("method,backend", [("moco-v2", "horovod"), ("byol", "mpi")])
def test_momentum_encoders_stay_identical_across_ranks(run_mpi, tmp_path: Path, method: str,
                                                       backend: str) -> None:
    """The momentum copy's parameters are equal on both ranks after 3 steps, and moved.

    Its BatchNorm running statistics are copied from the online network, whose statistics come
    from each rank's own shard (without --sync-bn), so those buffers are not compared: training
    uses batch statistics, and precise BN re-estimates them identically after each epoch."""
    r0, r1 = _run(run_mpi, tmp_path, method, 3, 1, backend)
    params = [n for n in r0["state"] if "running" not in n and "num_batches" not in n]
    target = [n for n in params if n.startswith(_target_prefix(method))]
    assert target and len(target) < len(params)
    for n in params:  # the online network and the momentum copy
        assert torch.equal(r0["state"][n], r1["state"][n]), n
    assert any(not torch.equal(r0["state"][n], r0["start"][n]) for n in target)
