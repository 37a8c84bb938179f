"""Run under `mpirun -np K`: a few data-parallel pre-training steps of a momentum method
(MoCo-v2 or BYOL) through `Pretrainer.train_epoch`, then each rank saves its model state and the
keys it computed itself at each step to OUT/rank-R.pt (test_horovod_momentum.py compares them).

    horovod_momentum_steps.py OUT METHOD STEPS BATCHES_PER_ALLREDUCE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: TensorPatches

from test_pretrain import TensorPatches  # noqa: E402

from hpcsrl.parallel.select import make_distribution  # noqa: E402
from hpcsrl.train.loop import PretrainConfig, Pretrainer  # noqa: E402

GLOBAL_BATCH = 8
QUEUE = 64


def main() -> None:
    out, method, steps, k = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    backend = sys.argv[5] if len(sys.argv) > 5 else "horovod"
    torch.set_num_threads(1)
    dist = make_distribution(backend=backend)
    options = {"queue_size": QUEUE} if method == "moco-v2" else {}
    cfg = PretrainConfig(method=method, bands="rgb", epochs=1, batch_size=GLOBAL_BATCH,
                         input_size=32, monitor_samples=0, progress=False, lr=0.05, precise_bn=0,
                         limit=GLOBAL_BATCH * steps, batches_per_allreduce=k,
                         method_options=options)
    trainer = Pretrainer(TensorPatches(n=40), cfg, out / "run", dist=dist)
    model = trainer.model
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    local: list[torch.Tensor] = []  # this rank's own keys of each step, before the enqueue
    after_step = model.after_step

    def recording_after_step(progress: float | None = None) -> None:
        if method == "moco-v2":
            local.append(model.queue.pending.clone())
        after_step(progress)

    model.after_step = recording_after_step
    trainer.train_epoch(0)
    torch.save({"state": {n: t.detach().clone() for n, t in model.state_dict().items()},
                "start": start, "local_keys": local}, out / f"rank-{dist.rank}.pt")
    trainer.lock.release()


if __name__ == "__main__":
    main()
