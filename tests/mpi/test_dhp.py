"""DHP under mpirun: exactness against single-process training, 3/2/1 chains, resume, report."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dhp_helpers import dhp_cmd, write_plan, write_rgb_h5  # noqa: E402

pytestmark = pytest.mark.mpi


def _report(out: Path) -> dict:
    return json.loads((out / "dhp_report.json").read_text())


def _assignment(out: Path) -> list[list[int]]:
    with (out / "dhp_assignment.csv").open() as f:
        return [[int(v) for v in row] for row in list(csv.reader(f))[1:]]


def test_one_fixed_chain_on_three_ranks_equals_single_process(run_mpi, tmp_path: Path) -> None:
    """Also: by default DHP pre-trains on the split's pool, as `hpcsrl pretrain` does (the
    single process reads only the pool, instrumented in tests/test_splits.py; equal weights
    mean DHP read the same patches), and records that split in its checkpoint."""
    from hpcsrl.data.splits import Layout, SplitPatches, load_split
    from hpcsrl.models.registry import model_from_checkpoint
    from hpcsrl.train.loop import PretrainConfig, Pretrainer

    data = write_rgb_h5(tmp_path / "p.h5", n=60)
    plan = write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[1, 1, 1])
    out = tmp_path / "dhp"
    run_mpi(3, dhp_cmd(plan, data, out, "--epochs", "1", "--chains", "fixed",
                       "--aggregate-every", "100"), timeout=300)
    split = load_split(out / "split.json", Layout.read(data))
    rep = _report(out)
    assert rep["iterations"] == 5 and [r["iterations"] for r in rep["ranks"]] == [5, 5, 5]
    dhp, ckpt = model_from_checkpoint(out / "checkpoint.pt")
    assert ckpt["dhp"]["iteration"] == 5
    assert ckpt["data"]["split"]["pretrain_on"] == "pool"
    assert ckpt["data"]["split"]["digest"] == split.digest()
    assert ckpt["data"]["patches"] == len(split.pool) < 60

    torch.set_num_threads(1)
    cfg = PretrainConfig(epochs=1, batch_size=4, input_size=32, bands="rgb", progress=False,
                         precise_bn=0)
    ref = Pretrainer(SplitPatches(data, "rgb", split), cfg, tmp_path / "ref")
    assert ref.steps_per_epoch == 5
    ref.train_epoch(0)
    ref_state = ref.model.state_dict()
    diffs = {k: (v.float() - ref_state[k].float()).abs().max().item()
             for k, v in dhp.state_dict().items()}
    worst = max(diffs, key=diffs.get)
    print(f"max abs diff DHP vs single process after 5 iterations: {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= 1e-5, worst
    # the optimiser state is per parameter, in model.parameters() order, as pretrain writes it
    ref_mom = ref.opt.state_dict()["state"]
    for i, st in ckpt["optimizer"]["state"].items():
        assert torch.allclose(st["momentum_buffer"], ref_mom[i]["momentum_buffer"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("chains", ["dynamic", "fixed"])
def test_six_ranks_three_two_one_every_minibatch_once_and_replicas_agree(
        run_mpi, tmp_path: Path, chains: str) -> None:
    """Fixed chains on 3/2/1 (Fig. 4a): chains 0-3-5, 1-4-5, 2-3-5; rank 3 serves two."""
    from hpcsrl.pipeline.schedule import FixedChains
    from hpcsrl.pipeline.topology import Layout

    data = write_rgb_h5(tmp_path / "p.h5", n=40)
    plan = write_plan(tmp_path / "plan.json", cuts=[6, 16], replicas=[3, 2, 1])
    out = tmp_path / "dhp"
    total, every = 15, 5
    run_mpi(6, dhp_cmd(plan, data, out, "--iterations", str(total), "--chains", chains,
                       "--aggregate-every", str(every)), timeout=600)
    rep = _report(out)
    rows = rep["ranks"]
    assert rep["iterations"] == total and rep["chains"] == chains
    for s in range(3):
        assert sum(r["iterations"] for r in rows if r["stage"] == s) == total
    rows_by_stage = [[r for r in rows if r["stage"] == s] for s in range(3)]
    for stage_rows in rows_by_stage:  # replicas equal after each of the 3 aggregations
        assert len({tuple(r["state_digests"]) for r in stage_rows}) == 1
        assert len(stage_rows[0]["state_digests"]) == 3
    assignment = _assignment(out)
    assert [a[0] for a in assignment] == list(range(total))
    for _mb, _, _, *chain in assignment:
        assert [s for s in range(3) for r in rows if r["rank"] == chain[s] and
                r["stage"] == s] == [0, 1, 2]
        if chains == "fixed":  # windows of 5 ids from 0: chain (mb mod 5) mod 3
            assert chain == FixedChains(Layout.of([3, 2, 1])).members[_mb % every % 3]
    counts = {r["rank"]: r["iterations"] for r in rows}
    if chains == "fixed":
        assert counts == {0: 6, 1: 6, 2: 3, 3: 9, 4: 6, 5: 15}
    print(f"{chains} 3/2/1: iterations per rank {counts}, "
          f"{rep['throughput_per_s']:.3f} mini-batches/s, scheduler "
          f"{rep['scheduler_ms_per_minibatch']:.3f} ms per mini-batch")
    for r in rows:
        assert r["bytes_sent"] > 0 or r["stage"] == 0 and r["iterations"] == 0
        assert r["peak_rss_bytes"] >= r["rss_before_stage_bytes"] > 0
        assert r["wait_s"] >= 0 and r["busy_s"] > 0
    assert (out / "dhp_ranks.csv").exists()
    assert np.isfinite(rep["throughput_per_s"])
