"""Data-parallel parts without a launcher: the LR schedules, the CPU SyncBatchNorm (against
BatchNorm on the concatenated batch, with a simulated second rank), launcher detection and the
collective error agreement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcsrl.errors import UserError
from hpcsrl.parallel.gloo_rendezvous import slot_layout
from hpcsrl.parallel.horovod import auto_groups
from hpcsrl.parallel.select import launched_ranks
from hpcsrl.parallel.sync_bn import SyncBatchNorm, convert_sync_bn
from hpcsrl.schedules import CosineDecay, WarmupDecay, default_decay_epochs, default_warmup_epochs
from hpcsrl.train.distribution import RankStopped, SingleProcess, everywhere


def test_warmup_then_step_decay():
    f = WarmupDecay(100, warmup_steps=10, start=0.25, kind="step", milestones=[30, 60, 80])
    assert f(0) == 0.25 and f(5) == pytest.approx(0.625) and f(10) == 1.0
    assert [f(29), f(30), f(60), f(99)] == pytest.approx([1.0, 0.1, 0.01, 0.001])


def test_warmup_then_cosine_and_plain_cosine_unchanged():
    f = WarmupDecay(100, warmup_steps=20, start=0.5)
    assert f(20) == 1.0 and f(60) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    plain, cos = WarmupDecay(37), CosineDecay(37)
    assert all(plain(t) == cos(t) for t in range(40))  # bit-identical to the old schedule


def test_recipe_defaults():
    assert default_warmup_epochs(100, 1) == 0 and default_warmup_epochs(100, 4) == 5
    assert default_warmup_epochs(10, 2) == 1 and default_warmup_epochs(3, 2) == 0
    assert default_decay_epochs(100) == [30, 60, 80] and default_decay_epochs(2) == [1]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 2), nn.BatchNorm1d(2))


def test_convert_keeps_parameters_and_state_keys():
    net = _net()
    params = [id(p) for p in net.parameters()]
    keys = list(net.state_dict())
    convert_sync_bn(net, lambda t: t, ranks=1)
    assert isinstance(net[1], SyncBatchNorm) and isinstance(net[5], SyncBatchNorm)
    assert [id(p) for p in net.parameters()] == params and list(net.state_dict()) == keys


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_bn_over_two_ranks_equals_bn_on_the_union(momentum):
    """A second rank with the same batch (reduce = x 2): outputs, input gradients and running
    statistics equal BatchNorm on the two batches concatenated (what SyncBN promises)."""
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    ref = nn.BatchNorm2d(3, momentum=momentum).double()
    nn.init.normal_(ref.weight)
    sync = convert_sync_bn(nn.Sequential(nn.BatchNorm2d(3, momentum=momentum).double()),
                           lambda t: 2 * t, ranks=2)[0]
    sync.load_state_dict(ref.state_dict())
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    ys = sync(xs)
    (ys * w).sum().backward()
    xr = torch.cat([x, x]).requires_grad_()
    y = ref(xr)
    (y * torch.cat([w, w])).sum().backward()
    assert torch.allclose(ys, y[:5], atol=1e-12)
    assert torch.allclose(xs.grad, xr.grad[:5], atol=1e-12)
    assert torch.allclose(sync.running_mean, ref.running_mean)
    assert torch.allclose(sync.running_var, ref.running_var)
    sync.eval()
    ref.eval()
    assert torch.allclose(sync(x), ref(x))


def test_launched_ranks(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "HOROVOD_SIZE",
                "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert launched_ranks() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a batch shell is not a job step
    assert launched_ranks() == 1
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    assert launched_ranks() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert launched_ranks() == 2


class _TwoRanks(SingleProcess):
    """Rank `rank` of 2 whose peer failed (or not) with `peer`."""

    size = 2

    def __init__(self, rank: int, peer: str | None) -> None:
        self.rank, self.peer = rank, peer

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def first_error(self, message):
        msgs = [message, self.peer] if self.rank == 0 else [self.peer, message]
        return next(((r, m) for r, m in enumerate(msgs) if m is not None), None)


def test_everywhere_reports_on_the_writer_and_stops_the_others():
    def fail():
        raise UserError("bad file")

    assert everywhere(_TwoRanks(0, None), lambda: 7) == 7
    with pytest.raises(UserError, match="^rank 1 of 2: bad file$"):
        everywhere(_TwoRanks(0, "bad file"), lambda: 7)
    with pytest.raises(UserError, match="^bad file$"):
        everywhere(_TwoRanks(0, None), fail)
    with pytest.raises(RankStopped):
        everywhere(_TwoRanks(1, "bad file"), lambda: 7)


def test_gloo_slots_follow_horovods_local_and_cross_ranks():
    """Ranks 0, 2 on host a and 1 on host b: local ranks by order on the host, cross ranks by
    the order of the hosts holding that local rank (what horovodrun assigns)."""
    slots = slot_layout(["a", "b", "a"])
    assert [(s["local_rank"], s["local_size"]) for s in slots] == [(0, 2), (0, 1), (1, 2)]
    assert [(s["cross_rank"], s["cross_size"]) for s in slots] == [(0, 2), (1, 2), (0, 1)]
    assert all(s["size"] == 3 for s in slots) and [s["rank"] for s in slots] == [0, 1, 2]
    one = slot_layout(["vm", "vm"])
    assert [(s["local_rank"], s["cross_rank"], s["cross_size"]) for s in one] == \
        [(0, 0, 1), (1, 0, 1)]


def test_auto_allreduce_mode_groups_only_when_the_cores_are_full():
    assert auto_groups(local_ranks=2, threads=1, cores=2) == 1   # this machine under mpirun -np 2
    assert auto_groups(local_ranks=1, threads=2, cores=2) == 1   # one rank, all cores computing
    assert auto_groups(local_ranks=2, threads=1, cores=4) == 0   # a spare core: overlap backward
    assert auto_groups(local_ranks=4, threads=1, cores=2) == 1   # oversubscribed
