"""Which patches form which mini-batch, and which views it gets: one assignment for every trainer.

A mini-batch is named by its id `(epoch, position)` in the epoch's global order. Everything random
about it (its patches, its two views) is derived from `(seed, epoch, position)` alone, so the single
process, Horovod ranks and DHP chains that compute the same mini-batch make the same views, and
a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from hpcsrl.errors import UserError


class SplitOptions(Protocol):
    seed: int
    monitor_samples: int
    limit: int | None


def seed_for(*words: int) -> int:
    """A 32-bit seed from a tuple of integers (independent streams for independent purposes)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


def labels_of(dataset: Any) -> np.ndarray | None:
    """The dataset's labels for the k-NN monitor, None when it has none."""
    return np.asarray(dataset.labels) if getattr(dataset, "has_labels", False) else None


def split_indices(n: int, labels: np.ndarray | None, cfg: SplitOptions
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, monitor, knn bank, knn query) dataset positions.

    The monitor set is a fixed random sample of the whole file; with labels, half of its labelled
    patches form the k-NN bank and the other half the query set, which is held out of training.
    `limit` caps the training patches (drawn at random from the rest).
    """
    rng = np.random.default_rng(seed_for(cfg.seed, 7))
    order = rng.permutation(n)
    monitor_idx = np.sort(order[:min(max(0, cfg.monitor_samples), n)])
    bank = query = np.zeros(0, dtype=np.int64)
    if labels is not None:
        labelled = monitor_idx[labels[monitor_idx] >= 0]
        if len(labelled) >= 4:
            bank, query = labelled[::2], labelled[1::2]
    train = order[~np.isin(order, query)]
    if cfg.limit is not None:
        train = train[:cfg.limit]
    return np.sort(train), monitor_idx, bank, query


def check_batch_size(n_train: int, batch_size: int, ranks: int = 1) -> None:
    """Refuse a global batch larger than the training patches (it would run 0 steps, or one
    ragged step with an LR scaled for a batch that never exists)."""
    if batch_size * ranks > n_train:
        what = f"{ranks} ranks x --batch-size {batch_size}" if ranks > 1 else \
            f"--batch-size {batch_size}"
        raise UserError(f"{what} is larger than the {n_train} training patches: lower the batch "
                        "size" + (" or the rank count" if ranks > 1 else "") +
                        " (or use more data)")


def epoch_batches(train: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's global mini-batches in order: a shuffle of `train` cut into full batches
    (the ragged tail is dropped: BatchNorm and the losses need equal, > 1 sized batches)."""
    perm = train[np.random.default_rng(seed_for(seed, epoch, 1)).permutation(len(train))]
    n_full = len(perm) // batch_size
    return [perm[i * batch_size:(i + 1) * batch_size] for i in range(n_full)]


def shard(batch: np.ndarray, rank: int, ranks: int) -> np.ndarray:
    """Rank `rank`'s equal part of one global mini-batch (data parallelism: every rank gets the
    same number of patches per step, so no rank stalls the allreduce)."""
    per = len(batch) // ranks
    return batch[rank * per:(rank + 1) * per]


def view_generator(seed: int, epoch: int, position: int, part: int = 0) -> torch.Generator:
    """The generator that draws the augmentations of mini-batch (epoch, position); `part` tells
    apart the shards of one global batch when ranks share it."""
    return torch.Generator().manual_seed(seed_for(seed, epoch, 2, position, part))


def describe(batches: list[np.ndarray]) -> dict[str, Any]:
    """A compact record of an epoch's assignment (for reports): count and patches per batch."""
    return {"batches": len(batches), "patches": int(sum(len(b) for b in batches))}
