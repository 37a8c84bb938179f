"""Supervised heads on top of an encoder: the linear probe (frozen features) and fine-tuning.

Both use Adam with a per-iteration cosine decay and batch 64 by default (the source paper's Sec. 5
protocol). A multi-label BCE head is trained beside the single-label one when the data is
multi-label, so one run yields both kinds of metric.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpcsrl.features.extract import BatchReader, as_tensor
from hpcsrl.features.precise_bn import clean_batches, recalibrate
from hpcsrl.precision import autocast
from hpcsrl.progress import progress_bar
from hpcsrl.schedules import CosineDecay


@dataclass
class FitConfig:
    epochs: int = 200
    finetune_epochs: int | None = None  # None: same as `epochs`
    batch_size: int = 64
    lr: float = 1e-3            # the linear head(s)
    encoder_lr: float = 1e-4    # the encoder when fine-tuning
    weight_decay: float = 0.0
    seed: int = 0
    augment: bool = True        # flips / 90-degree rotations while fine-tuning
    progress: bool = True
    cache_bytes: int = 1 << 30  # fine-tune inputs up to this size are read once and kept in memory
    precision: str = "fp32"     # encoder forward passes (features, fine-tuning): hpcsrl.precision
    finetune_head: str = "probe"  # fine-tuning starts from "probe" (a fitted probe) or "new"


class Head(nn.Module):
    """Linear single-label classifier, optional multi-label linear head, optional standardiser.

    The standardiser (train-set mean/std, fixed buffers) puts frozen features of very different
    scales (a random-init encoder's are huge) on the same footing for Adam's default step size.
    """

    def __init__(self, dim: int, n_classes: int, n_multi: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, n_classes)
        self.multi = nn.Linear(dim, n_multi) if n_multi else None

    def set_standardiser(self, feats: torch.Tensor) -> None:
        self.mean.copy_(feats.mean(dim=0))
        self.std.copy_(feats.std(dim=0, unbiased=False).clamp_min(1e-6))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = (f - self.mean) / self.std
        return self.linear(z), (self.multi(z) if self.multi is not None else None)


def _loss(head_out: tuple[torch.Tensor, torch.Tensor | None], y: torch.Tensor,
          mh: torch.Tensor | None) -> torch.Tensor:
    logits, ml_logits = head_out
    known = y >= 0  # multi-label-only samples (label -1) train the multi-label head alone
    loss = F.cross_entropy(logits[known], y[known]) if bool(known.any()) else logits.sum() * 0
    if ml_logits is not None and mh is not None:
        loss = loss + F.binary_cross_entropy_with_logits(ml_logits, mh)
    return loss


def _cosine(optimizer: torch.optim.Optimizer, total_steps: int
            ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's lr to 0 over `total_steps` iterations."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineDecay(total_steps))


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled positions 0..n-1 in chunks; each chunk sorted (HDF5 fancy reads need order)."""
    perm = rng.permutation(n)
    return [np.sort(perm[s:s + batch_size]) for s in range(0, n, batch_size)]


def predict(head: Head, feats: np.ndarray, batch_size: int = 4096
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Class predictions and, with a multi-label head, 0/1 label predictions (sigmoid > 0.5)."""
    head.eval()
    preds, ml = [], []
    with torch.no_grad():
        for s in range(0, len(feats), batch_size):
            logits, ml_logits = head(torch.from_numpy(feats[s:s + batch_size]).float())
            preds.append(logits.argmax(dim=1).numpy())
            if ml_logits is not None:
                ml.append((ml_logits > 0).numpy().astype(np.uint8))
    if not preds:  # nothing to predict (e.g. a validation-only run's test part)
        return np.zeros(0, np.int64), None
    return np.concatenate(preds), (np.concatenate(ml) if ml else None)


def fit_linear(feats: np.ndarray, labels: np.ndarray, n_classes: int, cfg: FitConfig,
               multi_hot: np.ndarray | None = None) -> Head:
    """Train the head(s) on precomputed frozen features (the encoder is not involved at all)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    f = torch.from_numpy(np.ascontiguousarray(feats)).float()
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    mh = None if multi_hot is None else torch.from_numpy(np.asarray(multi_hot, np.float32))
    head = Head(f.shape[1], n_classes, 0 if mh is None else mh.shape[1])
    head.set_standardiser(f)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(f) / cfg.batch_size)
    sched = _cosine(opt, cfg.epochs * steps_per_epoch)
    head.train()
    for _ in progress_bar(range(cfg.epochs), desc="linear probe", unit="epoch",
                  disable=not cfg.progress, leave=False):
        for b in _batches(len(f), cfg.batch_size, rng):
            bt = torch.from_numpy(b)
            loss = _loss(head(f[bt]), y[bt], None if mh is None else mh[bt])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal flip and 0/90/180/270-degree rotation (square patches)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = torch.randint(0, 4, (len(x),), generator=gen)
    out = x.clone()
    for r in range(1, 4):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


class _TrainInputs:
    """Training inputs of the fine-tune set: in memory when small enough, else read per batch."""

    def __init__(self, read: BatchReader, indices: np.ndarray, cache_bytes: int) -> None:
        self.read, self.indices = read, indices
        first = as_tensor(read(indices[:1]))
        self.cached: torch.Tensor | None = None
        if first.numel() * first.element_size() * len(indices) <= cache_bytes:
            self.cached = torch.cat([as_tensor(read(indices[s:s + 512])).float()
                                     for s in range(0, len(indices), 512)])

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[torch.from_numpy(positions)]
        return as_tensor(self.read(self.indices[positions])).float()


def fine_tune(encoder: nn.Module, feature_dim: int, read: BatchReader, train_idx: np.ndarray,
              labels: np.ndarray, n_classes: int, cfg: FitConfig,
              multi_hot: np.ndarray | None = None, init_feats: np.ndarray | None = None,
              head: Head | None = None) -> Head:
    """Train encoder and head(s) together (in place on `encoder`); returns the head.

    `labels` / `multi_hot` are indexed by sample index (whole-dataset arrays); `train_idx` are the
    sample indices to train on. `init_feats` (the untouched encoder's features of `train_idx`)
    fix the head's standardiser so the starting feature scale does not matter. `head`, when
    given, is the starting head (a copy is trained): a fitted linear probe there is "LP-FT"
    (Kumar et al., ICLR 2022), which keeps a short fine-tune from first dragging good features
    towards a random head's gradients.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_idx = np.sort(np.asarray(train_idx))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)[train_idx])
    mh = None if multi_hot is None else torch.from_numpy(
        np.asarray(multi_hot, np.float32)[train_idx])
    if head is not None:
        head = copy.deepcopy(head)
    else:
        head = Head(feature_dim, n_classes, 0 if mh is None else mh.shape[1])
        if init_feats is not None:
            head.set_standardiser(torch.from_numpy(np.ascontiguousarray(init_feats)).float())
    inputs = _TrainInputs(read, train_idx, cfg.cache_bytes)
    opt = torch.optim.Adam([
        {"params": encoder.parameters(), "lr": cfg.encoder_lr},
        {"params": head.parameters(), "lr": cfg.lr},
    ], weight_decay=cfg.weight_decay)
    epochs = cfg.finetune_epochs or cfg.epochs
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    sched = _cosine(opt, epochs * steps_per_epoch)
    encoder.train()
    head.train()
    bar = progress_bar(total=epochs * steps_per_epoch, desc="fine-tune", unit="it",
               disable=not cfg.progress, leave=False)
    for _ in range(epochs):
        for b in _batches(len(train_idx), cfg.batch_size, rng):
            if len(b) < 2 and len(train_idx) >= 2:
                continue  # BatchNorm cannot train on a single sample
            x = inputs(b)
            if cfg.augment:
                x = augment_batch(x, gen)
            bt = torch.from_numpy(b)
            with autocast(cfg.precision):
                f = encoder(x)
            loss = _loss(head(f.flatten(1).float()), y[bt], None if mh is None else mh[bt])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    # The running statistics trail weights that kept changing (after a short run they still mostly
    # describe the starting encoder): one clean pass makes them match the weights evaluated.
    with autocast(cfg.precision):
        recalibrate(encoder, encoder, clean_batches(inputs, np.arange(len(train_idx)),
                                                    cfg.batch_size, cfg.seed))
    encoder.eval()
    return head
