"""Supervised multi-label classification of the HDF5 `classes` (BigEarthNet-style), after
Sedona et al. Sec. 3.4-3.5: a ResNet adapted to the patch size and band count, dropout 0.5 before
the last layer, sigmoid + binary cross-entropy, L2 weight decay on the weights of convolutions and
the classifier, random 90-degree rotations / flips and mix-up, SGD with Nesterov momentum and the
data-parallel LR recipe (lr = 0.1 x batch / 256, warm-up, x0.1 at 30/60/80 % of the epochs).

It shares the parts of pre-training: the split (split.json: trains on the pool, chooses nothing,
reports F1 on validation after each epoch and on test at the end), the batch assignment and view
generators, optimiser and schedule, the `Distribution` (one process or Horovod), the output-folder
lock, atomic checkpoints (plan-independent, `weights_only`) and exact --resume.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcsrl.errors import UserError
from hpcsrl.eval.metrics import confusion_matrix, multilabel_f1, per_class_scores
from hpcsrl.eval.train import augment_batch
from hpcsrl.fileio import atomic_path
from hpcsrl.log import get_logger
from hpcsrl.models.resnet import ResNet
from hpcsrl.precision import autocast, check_precision
from hpcsrl.progress import progress_bar
from hpcsrl.schedules import (
    SCHEDULES,
    WarmupDecay,
    default_decay_epochs,
    default_lr,
    default_warmup_epochs,
)
from hpcsrl.train.batches import check_batch_size, epoch_batches, seed_for, shard, view_generator
from hpcsrl.train.checkpoint import read_checkpoint, rng_state, set_rng_state, write_checkpoint
from hpcsrl.train.distribution import Distribution, SingleProcess, everywhere
from hpcsrl.train.lock import RunLock
from hpcsrl.train.optim import accumulated_step, make_optimizer, make_scheduler

CHECKPOINT = "checkpoint.pt"
LOG_COLUMNS = ("epoch", "loss", "lr", "val_f1_micro", "val_f1_macro", "seconds", "images_per_s")
RESUME_KEYS = ("backbone", "bands", "epochs", "batch_size", "lr", "weight_decay", "momentum",
               "nesterov", "schedule", "warmup_epochs", "decay_epochs", "dropout", "mixup",
               "seed", "precision")


@dataclass
class ClassifyConfig:
    backbone: str = "resnet50"
    bands: str = "s2"
    epochs: int = 100
    batch_size: int = 64            # over all ranks
    lr: float | None = None         # None: 0.1 x batch / 256 (the seed's rule)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "step"
    warmup_epochs: int | None = None
    decay_epochs: list[int] | None = None
    dropout: float = 0.5
    mixup: float = 0.2              # Beta(a, a) mixing weights; 0: off
    seed: int = 0
    threshold: float = 0.5          # sigmoid output -> label present
    progress: bool = True
    batches_per_allreduce: int = 1
    precision: str = "fp32"         # forward passes: fp32 or bf16 autocast (hpcsrl.precision)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.batch_size, base=0.1)


class MultiLabelResNet(nn.Module):
    """ResNet trunk (any band count; global pooling adapts it to any patch size >= 32 px),
    dropout, one linear layer: (N, C, H, W) -> (N, classes) logits."""

    def __init__(self, backbone: str, in_channels: int, n_classes: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone = ResNet(backbone, in_channels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.feature_dim, n_classes)
        self.config = {"task": "multilabel", "backbone": backbone, "in_channels": in_channels,
                       "n_classes": n_classes, "dropout": dropout}

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.backbone(x)))


def load_encoder(model: MultiLabelResNet, path: str | Path) -> None:
    """Backbone weights of a pre-training checkpoint (`hpcsrl pretrain`) into `model`."""
    ckpt = read_checkpoint(path)
    config = ckpt.get("config") or {}
    want = model.config
    if config.get("backbone") != want["backbone"] or \
            config.get("in_channels") != want["in_channels"]:
        raise UserError(f"{path}: pre-trained with {config.get('backbone')} on "
                        f"{config.get('in_channels')} bands; --init needs --backbone "
                        f"{config.get('backbone')} and a band set of {config.get('in_channels')} "
                        f"bands (now {want['backbone']}, {want['in_channels']})")
    state = {k.removeprefix("backbone."): v for k, v in ckpt.get("model", {}).items()
             if k.startswith("backbone.")}
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: its backbone weights do not fit ({str(exc).splitlines()[0]})"
                        ) from None


def mixup(x: Tensor, y: Tensor, alpha: float, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample mix with a shuffled copy of the batch, weights from Beta(alpha, alpha)."""
    if alpha <= 0:
        return x, y
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=len(x)).astype(np.float32))
    perm = torch.from_numpy(rng.permutation(len(x)))
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (lam.view(shape) * x + (1 - lam.view(shape)) * x[perm],
            lam[:, None] * y + (1 - lam[:, None]) * y[perm])


def f1_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Micro / macro F1 (hpcsrl.eval.metrics) and per-class F1 and support."""
    scores: dict[str, Any] = multilabel_f1(truth, pred)
    per = [per_class_scores(confusion_matrix(truth[:, c], pred[:, c], 2)) for c in
           range(truth.shape[1])]
    scores["per_class_f1"] = [float(p["f1"][1]) for p in per]
    scores["support"] = [int(p["support"][1]) for p in per]
    return scores


def _rows_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    return buf.getvalue()


class ClassTrainer:
    """Model, optimiser, schedule and epoch loop of multi-label training on one split."""

    def __init__(self, dataset: Any, split: Any, cfg: ClassifyConfig, out_dir: str | Path,
                 resume: bool = False, init: str | None = None,
                 dist: Distribution | None = None) -> None:
        self.log = get_logger("hpcsrl.train")
        self.dist: Distribution = dist or SingleProcess()
        self.rank0 = self.dist.is_writer
        self.out = Path(out_dir)
        self.lock = RunLock(self.out)
        try:
            ckpt = everywhere(self.dist, lambda: self._setup(dataset, split, cfg, resume, init))
            self._start(ckpt)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, ds: Any, split: Any, cfg: ClassifyConfig, resume: bool,
               init: str | None) -> dict[str, Any] | None:
        if self.rank0:
            self.lock.acquire()
        if cfg.schedule not in SCHEDULES:
            raise UserError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        check_precision(cfg.precision)
        if getattr(ds, "multi_hot", None) is None:
            raise UserError(f"{getattr(ds, 'path', 'the data')}: no `classes` dataset (multi-label "
                            "targets, N x K 0/1): hpcsrl train needs a file written from labelled "
                            "scenes (BigEarthNet, or hpcsrl synth with --classes)")
        self.ds, self.split = ds, split
        self.targets = np.asarray(ds.multi_hot, np.float32)
        self.train_idx = np.sort(np.asarray(split.pool, np.int64))
        self.val_idx = np.sort(np.asarray(split.val, np.int64))
        self.test_idx = np.sort(np.asarray(split.test, np.int64))
        ranks = self.dist.size
        if 2 * ranks > len(self.train_idx):
            raise UserError(f"{ranks} ranks need at least {2 * ranks} training patches (2 per "
                            f"rank and step) but the split's pool has {len(self.train_idx)}")
        check_batch_size(len(self.train_idx), cfg.batch_size)
        k = cfg.batches_per_allreduce
        if cfg.batch_size % (ranks * k) or cfg.batch_size // (ranks * k) < 2:
            raise UserError(f"--batch-size {cfg.batch_size} must split into {ranks} rank(s) x "
                            f"{k} micro-batch(es) of at least 2 patches")
        defaults = {"warmup_epochs": default_warmup_epochs(cfg.epochs, ranks),
                    "decay_epochs": (default_decay_epochs(cfg.epochs)
                                     if cfg.schedule == "step" else [])}
        self.cfg = cfg = replace(cfg, **{k: v for k, v in defaults.items()
                                         if getattr(cfg, k) is None})
        torch.manual_seed(cfg.seed)
        model = MultiLabelResNet(cfg.backbone, ds.channels, self.targets.shape[1], cfg.dropout)
        if init is not None:
            load_encoder(model, init)
        self.model = self.dist.prepare_model(model)
        self.steps_per_epoch = len(epoch_batches(self.train_idx, cfg.batch_size, cfg.seed, 0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if not self.rank0:
            return None
        path = self.out / CHECKPOINT
        if path.exists() and not resume:
            raise UserError(f"{path} exists: pass --resume to continue that run, or choose "
                            "another --out")
        if not (resume and path.exists()):
            return None
        ckpt = read_checkpoint(path)
        saved, now = {"precision": "fp32", **ckpt.get("train", {})}, self._record()
        diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})"
                for k in RESUME_KEYS if saved.get(k) != now[k]]
        if ckpt.get("config") != self.model.config or ckpt.get("split") != split.digest():
            diff.append("model or split")
        if diff:
            raise UserError(f"{path} was made with different options: {'; '.join(diff)}. "
                            "Resume with the same options and data, or choose another --out")
        return ckpt

    def _record(self) -> dict[str, Any]:
        rec = asdict(self.cfg)
        for k in ("progress", "batches_per_allreduce", "threshold"):
            rec.pop(k)
        return rec

    def _start(self, ckpt: dict[str, Any] | None) -> None:
        cfg = self.cfg
        weights = [p for n, p in self.model.named_parameters() if p.dim() > 1]
        others = [p for n, p in self.model.named_parameters() if p.dim() <= 1]
        groups = [{"params": weights}, {"params": others, "weight_decay": 0.0}]
        self.opt = self.dist.wrap_optimizer(make_optimizer(groups, cfg, nesterov=cfg.nesterov),
                                            self.model, backward_passes=cfg.batches_per_allreduce)
        factor = WarmupDecay(self.total_steps, cfg.warmup_epochs * self.steps_per_epoch,
                             start=1.0 / self.dist.size, kind=cfg.schedule,
                             milestones=[e * self.steps_per_epoch for e in cfg.decay_epochs])
        self.sched = make_scheduler(self.opt, self.total_steps, factor)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            self.history, self.start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
            self.log.info("resumed %s after epoch %d of %d", self.out / CHECKPOINT,
                          self.start_epoch, cfg.epochs)
        if self.dist.size > 1:
            extra = self.dist.broadcast_state(self.model, self.opt, {
                "scheduler": self.sched.state_dict(), "rng": rng_state(),
                "history": self.history, "start_epoch": self.start_epoch})
            if not self.rank0 and extra is not None:
                self.sched.load_state_dict(extra["scheduler"])
                set_rng_state(extra["rng"])
                self.history, self.start_epoch = extra["history"], extra["start_epoch"]

    # --- training ---------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        rows = np.sort(rows)
        return self.ds.read_batch(rows)[0].float(), torch.from_numpy(self.targets[rows])

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimisation step (k micro-batches, gradients summed); returns the local loss."""
        k = self.cfg.batches_per_allreduce

        def bce(xi: Tensor, yi: Tensor) -> Tensor:
            return F.binary_cross_entropy_with_logits(self.model(xi).float(), yi)

        return accumulated_step(self.opt, bce, zip(x.chunk(k), y.chunk(k), strict=True), k,
                                self.cfg.base_lr, self.cfg.precision)

    def train_epoch(self, epoch: int) -> tuple[float, int, float, float]:
        cfg, rank = self.cfg, self.dist.rank
        batches = [shard(b, rank, self.dist.size)
                   for b in epoch_batches(self.train_idx, cfg.batch_size, cfg.seed, epoch)]
        self.model.train()
        total, images, lr, t0 = 0.0, 0, float("nan"), time.perf_counter()
        bar = progress_bar(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           disable=not (cfg.progress and self.rank0))
        for i, rows in enumerate(bar):
            x, y = self.read(rows)
            g = view_generator(cfg.seed, epoch, i, rank)
            x = augment_batch(x, g)
            x, y = mixup(x, y, cfg.mixup, np.random.default_rng(seed_for(cfg.seed, epoch, 3, i,
                                                                         rank)))
            try:
                loss = self.step(x, y)
            except UserError as exc:
                raise UserError(f"epoch {epoch + 1}, batch {i + 1}: {exc}") from None
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            total += float(loss)
            images += len(rows) * self.dist.size
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.close()
        return (self.dist.average(total / max(1, len(batches)), "loss"), images,
                time.perf_counter() - t0, lr)

    @torch.no_grad()
    def predict(self, rows: np.ndarray, batch: int = 256) -> np.ndarray:
        self.model.eval()
        out = [np.zeros((0, self.targets.shape[1]), np.uint8)]
        for s in range(0, len(rows), batch):
            with autocast(self.cfg.precision):
                logits = self.model(self.read(rows[s:s + batch])[0])
            prob = torch.sigmoid(logits.float())
            out.append((prob > self.cfg.threshold).numpy().astype(np.uint8))
        return np.concatenate(out)

    def evaluate(self, rows: np.ndarray) -> dict[str, Any] | None:
        if len(rows) == 0:
            return None
        return f1_scores(self.targets[rows].astype(np.uint8), self.predict(rows))

    def save(self, epoch: int) -> None:
        if not self.rank0:
            return
        write_checkpoint(self.out / CHECKPOINT, {
            "config": self.model.config, "train": self._record(), "epoch": epoch,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": rng_state(), "history": self.history,
            "band_names": list(self.ds.band_names), "class_names": list(self.class_names()),
            "split": self.split.digest(), "ranks": self.dist.size})
        with atomic_path(self.out / "log.csv") as tmp:
            tmp.write_text(_rows_csv(self.history, LOG_COLUMNS))

    def class_names(self) -> list[str]:
        names = list(getattr(self.ds, "class_names", ()) or ())
        k = self.targets.shape[1]
        return names if len(names) == k else [f"class_{c}" for c in range(k)]

    def report(self) -> dict[str, Any] | None:
        """Test-set F1 (micro, macro, per class) into OUT/test_f1.csv; rank 0 only."""
        scores = self.evaluate(self.test_idx)
        if scores is None:
            self.log.info("the split has no test patches: no test F1")
            return None
        rows = [{"class": name, "f1": f, "support": s} for name, f, s in
                zip(self.class_names(), scores["per_class_f1"], scores["support"], strict=True)]
        rows += [{"class": "micro", "f1": scores["ml_f1_micro"], "support": len(self.test_idx)},
                 {"class": "macro", "f1": scores["ml_f1_macro"], "support": len(self.test_idx)}]
        with atomic_path(self.out / "test_f1.csv") as tmp:
            tmp.write_text(_rows_csv(rows, ("class", "f1", "support")))
        self.log.info("test F1 micro %.3f  macro %.3f on %d patches -> %s",
                      scores["ml_f1_micro"], scores["ml_f1_macro"], len(self.test_idx),
                      self.out / "test_f1.csv")
        return scores

    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train the remaining epochs (or up to epoch `stop_after`), checkpoint after each, then
        the test F1 report once all epochs are done. Releases the folder lock."""
        try:
            cfg = self.cfg
            self.log.info("multi-label %s on %d pool patches (%d bands, %d classes), val %d, "
                          "test %d: %d epochs x %d steps, batch %d%s, lr %g (%s, warm-up %d)",
                          cfg.backbone, len(self.train_idx), self.ds.channels,
                          self.targets.shape[1], len(self.val_idx), len(self.test_idx),
                          cfg.epochs, self.steps_per_epoch, cfg.batch_size,
                          f" ({self.dist.size} ranks, {self.dist.describe()['kind']})"
                          if self.dist.size > 1 else "",
                          cfg.base_lr, cfg.schedule, cfg.warmup_epochs)
            last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
            for epoch in range(self.start_epoch, last):
                loss, images, seconds, lr = self.train_epoch(epoch)
                val = self.evaluate(self.val_idx) if self.rank0 else None
                row = {"epoch": epoch + 1, "loss": loss, "lr": lr,
                       "val_f1_micro": None if val is None else val["ml_f1_micro"],
                       "val_f1_macro": None if val is None else val["ml_f1_macro"],
                       "seconds": seconds,
                       "images_per_s": images / seconds if seconds > 0 else math.nan}
                self.history.append(row)
                self.save(epoch + 1)
                self.log.info("epoch %d/%d  loss %.4f  lr %.4g  val F1 micro %s  %.1f s",
                              epoch + 1, cfg.epochs, loss, lr,
                              "-" if val is None else f"{val['ml_f1_micro']:.3f}", seconds)
            if self.rank0 and last == cfg.epochs:
                self.report()
            return self.history
        finally:
            self.lock.release()
