"""Run under `mpirun -np K`: a few data-parallel Pretrainer steps in float64 with eval-mode
BatchNorm, then each rank saves its parameters to OUT/rank-R.pt (test_horovod_dp.py compares them
with one process trained on the union of the ranks' batches).

    horovod_steps.py OUT STEPS [--batches-per-allreduce N] [--sync-bn] [--backend mpi|horovod]

With --sync-bn BatchNorm stays in training mode and uses statistics over both ranks, which equal
one process's statistics over the union.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: TensorPatches

from test_pretrain import TensorPatches  # noqa: E402

from hpcsrl.parallel.select import make_distribution  # noqa: E402
from hpcsrl.train.batches import view_generator  # noqa: E402
from hpcsrl.train.loop import PretrainConfig, Pretrainer  # noqa: E402

EXACT_CFG = dict(method="lite-srl", bands="rgb", epochs=2, batch_size=8, input_size=32,
                 monitor_samples=0, progress=False, lr=0.05, precise_bn=0, nesterov=True,
                 warmup_epochs=0, schedule="step", decay_epochs=[1])


def train_steps(trainer: Pretrainer, steps: int, batch_stats: bool = False) -> None:
    """`steps` steps of epoch 0 in float64, BN in eval mode unless `batch_stats`."""
    trainer.model.double().train(batch_stats)
    rank, cfg = trainer.dist.rank, trainer.cfg
    for i, batch in enumerate(trainer.my_batches(0)[:steps]):
        x = trainer.ds.read_batch(batch)[0]
        x_a, x_b = trainer.views(x, view_generator(cfg.seed, 0, i, rank))
        trainer.step(x_a.double(), x_b.double())
        trainer.sched.step()


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    argv = sys.argv
    k = int(argv[argv.index("--batches-per-allreduce") + 1]) if "--batches-per-allreduce" in argv \
        else 1
    backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "horovod"
    sync_bn = "--sync-bn" in argv
    torch.set_num_threads(1)
    dist = make_distribution(sync_bn=sync_bn, backend=backend)
    trainer = Pretrainer(TensorPatches(n=40), PretrainConfig(**EXACT_CFG, batches_per_allreduce=k),
                         out / "run", dist=dist)
    train_steps(trainer, steps, batch_stats=sync_bn)
    torch.save({name: t.detach().clone() for name, t in trainer.model.state_dict().items()},
               out / f"rank-{dist.rank}.pt")
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(dist.describe()))
    trainer.lock.release()


if __name__ == "__main__":
    main()
