"""Self-supervised pre-training with exact resume, in one process or data parallel.

Every source of randomness is derived from (seed, epoch): the data order from a NumPy generator
and the augmentations from a torch generator, both re-seeded at each epoch start. Together with the
model, optimiser and LR-scheduler state saved after every epoch (and the global RNG states, for
anything else that draws from them), a resumed run repeats the uninterrupted one bit for bit.
Labels are never used for training: only the held-out k-NN monitor reads them.

After each epoch the BatchNorm statistics are re-estimated on clean patches (`precise_bn`), so
the checkpoint's eval-mode encoder fits un-augmented full-size inputs even when the views were
smaller (`input_size` 32 on 64-px chips trains about 3.5x faster per step on CPU).

Data parallel (`dist` from `hpcsrl.parallel.select`: MPI or Horovod): every rank trains on its
shard of each global mini-batch with its own view generator; rank 0 alone holds the folder lock,
reads the checkpoint on --resume and writes checkpoints and logs, and broadcasts its state.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcsrl.augment.views import DEFAULT_AUGMENT, ViewTransform, make_view_transform, two_views
from hpcsrl.errors import UserError
from hpcsrl.features import monitor
from hpcsrl.features.extract import extract
from hpcsrl.features.precise_bn import clean_batches, recalibrate
from hpcsrl.fileio import atomic_path
from hpcsrl.log import get_logger
from hpcsrl.models.base import SSLMethod
from hpcsrl.models.registry import PAIRED_MODALITY_METHODS, build_method
from hpcsrl.precision import autocast, check_precision
from hpcsrl.progress import progress_bar
from hpcsrl.schedules import (
    SCHEDULES,
    WarmupDecay,
    default_decay_epochs,
    default_lr,
    default_warmup_epochs,
)
from hpcsrl.train.batches import (
    check_batch_size,
    epoch_batches,
    labels_of,
    seed_for,
    shard,
    split_indices,
    view_generator,
)
from hpcsrl.train.checkpoint import read_checkpoint, rng_state, set_rng_state, write_checkpoint
from hpcsrl.train.distribution import Distribution, SingleProcess, everywhere
from hpcsrl.train.lock import RunLock
from hpcsrl.train.optim import accumulated_step, make_optimizer, make_scheduler

LOG_COLUMNS = ("epoch", "loss", "lr", "emb_std", "knn_acc", "seconds", "images_per_s")
CHECKPOINT = "checkpoint.pt"
# Options that must be unchanged for --resume to continue the same run.
RESUME_KEYS = ("method", "backbone", "bands", "epochs", "batch_size", "input_size", "lr",
               "weight_decay", "momentum", "seed", "limit", "monitor_samples", "method_options",
               "augment", "nesterov", "schedule", "warmup_epochs", "decay_epochs", "precision")
# Values of the schedule options in checkpoints written before they existed (one process).
LEGACY_SCHEDULE = {"nesterov": False, "schedule": "cosine", "warmup_epochs": 0,
                   "decay_epochs": []}
# Values of other options in checkpoints written before they existed.
LEGACY_OPTIONS = {**LEGACY_SCHEDULE, "precision": "fp32"}


@dataclass
class PretrainConfig:
    method: str = "lite-srl"
    backbone: str = "resnet18"
    bands: str = ""                 # recorded for checkpoints / resume checks
    epochs: int = 10
    batch_size: int = 64
    input_size: int = 64
    lr: float | None = None         # None: 0.05 * batch_size / 256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    seed: int = 0
    workers: int = 0
    limit: int | None = None        # use at most this many patches
    monitor_samples: int = 512      # patches for the embedding-std / k-NN monitor
    knn_k: int = 20
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)
    augment: str = DEFAULT_AUGMENT  # view-strength preset (hpcsrl.augment.views)
    precise_bn: int = 2048          # clean patches for BN statistics after each epoch (0: off)
    in_memory: bool = False         # read every patch once and keep them in memory
    # Data-parallel recipe (None: the default for the rank count, or the checkpoint's on resume):
    nesterov: bool | None = None        # Nesterov momentum (default: with several ranks)
    schedule: str = "cosine"            # after the warm-up: "cosine" to 0 or "step" x0.1
    warmup_epochs: int | None = None    # linear warm-up from lr / ranks (default: schedules)
    decay_epochs: list[int] | None = None  # "step": epochs of each x0.1 (default 30/60/80 %)
    batches_per_allreduce: int = 1      # micro-batches (backward passes) per optimiser step
    precision: str = "fp32"             # forward passes: fp32 or bf16 autocast (hpcsrl.precision)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.batch_size)


def band_stats(dataset: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-band mean/std the dataset normalised with (None, None for data without them)."""
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is None or std is None:
        return None, None
    return np.asarray(mean, np.float32).reshape(-1), np.asarray(std, np.float32).reshape(-1)


def view_transform(dataset: Any, cfg: PretrainConfig) -> ViewTransform | None:
    """The run's augmentation (None for paired modalities, which are only resized)."""
    if cfg.method in PAIRED_MODALITY_METHODS:
        return None
    mean, std = band_stats(dataset)
    return make_view_transform(dataset.sensor, dataset.band_names, cfg.input_size, mean=mean,
                               std=std, augment=cfg.augment)


def views(transform: ViewTransform | None, input_size: int, x: Tensor, g: torch.Generator
          ) -> tuple[Tensor, Tensor]:
    """The two views of a mini-batch's patches, drawn from its own generator, channels-last
    (every trainer calls this: single process, data parallel, DHP's first stages)."""
    if transform is not None:
        x_a, x_b = two_views(transform, x.float(), g)
    else:
        if x.shape[-1] != input_size:  # paired modalities: no augmentation, only the size
            x = F.interpolate(x.float(), size=(input_size,) * 2, mode="bilinear",
                              align_corners=False, antialias=True)
        x_a = x_b = x.float()
    return (x_a.contiguous(memory_format=torch.channels_last),
            x_b.contiguous(memory_format=torch.channels_last))


class _BatchReader(torch.utils.data.Dataset):
    """Item i = one whole batch (`read_batch`), so DataLoader workers read in parallel."""

    def __init__(self, dataset: Any, batches: list[np.ndarray]) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Tensor:
        return self.dataset.read_batch(np.sort(self.batches[i]))[0]


def iter_batches(dataset: Any, batches: list[np.ndarray], workers: int) -> Iterator[Tensor]:
    if workers <= 0:
        for b in batches:
            yield dataset.read_batch(np.sort(b))[0]
        return
    loader = torch.utils.data.DataLoader(_BatchReader(dataset, batches), batch_size=None,
                                         num_workers=workers, shuffle=False)
    yield from loader


class MemoryPatches:
    """A dataset's patches read once into memory; other attributes come from the dataset.

    Random batch reads from an HDF5 file (above all a virtual dataset with one mapping per patch)
    cost about as much as a training step on 32-px views; reading everything once in order
    removes that from every step.
    """

    def __init__(self, dataset: Any, chunk: int = 2048, progress: bool = True) -> None:
        self.dataset = dataset
        n = len(dataset)
        parts = [dataset.read_batch(np.arange(s, min(n, s + chunk)))[0]
                 for s in progress_bar(range(0, n, chunk), desc="loading patches",
                                       unit="chunk", leave=False, disable=not progress)]
        self.x = torch.cat(parts) if parts else torch.empty(0)

    def __len__(self) -> int:
        return len(self.x)

    def __getattr__(self, name: str) -> Any:
        if "dataset" not in self.__dict__:  # during unpickling
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def read_batch(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        labels = getattr(self.dataset, "labels", None)
        y = (torch.as_tensor(np.asarray(labels)[idx.numpy()]) if labels is not None
             else torch.full((len(idx),), -1, dtype=torch.int64))
        return self.x[idx], y


class _Embedding(nn.Module):
    """model.embedding as a module (for the shared feature extractor)."""

    def __init__(self, model: SSLMethod) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.embedding(x)


def _format_rows(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float)
                                                  and math.isnan(r[k])) else r[k])
                    for k in LOG_COLUMNS})
    return buf.getvalue()


class Pretrainer:
    """Owns model, optimiser, schedule and the epoch loop for one dataset and output folder.

    `dist` says how ranks share a step (`hpcsrl.train.distribution`): alone by default, or data
    parallel (each rank trains on its shard of every global mini-batch, gradients averaged). The
    loop, the batch assignment, the schedule, checkpoints and monitors are the same either way;
    only the writer rank (0) logs, checkpoints and holds the output-folder lock.
    """

    def __init__(self, dataset: Any, cfg: PretrainConfig, out_dir: str | Path,
                 resume: bool = False, dist: Distribution | None = None) -> None:
        self.log = get_logger("hpcsrl.pretrain")
        self.dist: Distribution = dist or SingleProcess()
        self.rank0 = self.dist.is_writer
        self.out = Path(out_dir)
        self.lock = RunLock(self.out)
        try:
            # Local checks first, agreed on by all ranks; then the collectives (broadcasts).
            ckpt = everywhere(self.dist, lambda: self._setup(dataset, cfg, resume))
            self._start(ckpt)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, dataset: Any, cfg: PretrainConfig, resume: bool) -> dict[str, Any] | None:
        """Everything a rank can check alone; returns the checkpoint to resume (rank 0 only)."""
        if self.rank0:
            self.lock.acquire()
        if cfg.schedule not in SCHEDULES:
            raise UserError(f"--schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        check_precision(cfg.precision)
        if cfg.in_memory:
            dataset = MemoryPatches(dataset, progress=cfg.progress and self.rank0)
        self.ds, self.cfg = dataset, cfg
        self.paired = cfg.method in PAIRED_MODALITY_METHODS
        if self.paired and getattr(dataset, "sensor", None) != "s1s2":
            raise UserError(f"--method {cfg.method} pairs Sentinel-2 with Sentinel-1: it needs "
                            f"--bands s1s2 (got a {getattr(dataset, 'sensor', '?')} band set)")
        n = len(dataset)
        labels = labels_of(dataset)
        self.train_idx, self.monitor_idx, self.bank, self.query = split_indices(n, labels, cfg)
        if len(self.train_idx) < 2:
            split = getattr(dataset, "split_record", None)
            why = "check --limit and the HDF5 file"
            if split and split.get("pretrain_on") == "pool":
                why = (f"the split {split['path']} leaves {split['n_pool']} pool patches after "
                       f"{split['n_test']} test, {split['n_val']} validation and "
                       f"{split['n_guard']} guard-band patches: use more data, or --pretrain-on "
                       "all to pre-train on every patch deliberately")
            raise UserError(f"only {len(self.train_idx)} patch(es) to train on: need at least 2 "
                            f"({why})")
        ranks = self.dist.size
        if 2 * ranks > len(self.train_idx):
            raise UserError(f"{ranks} ranks need at least {2 * ranks} training patches (2 per "
                            f"rank and step) but there are {len(self.train_idx)}: start at most "
                            f"{len(self.train_idx) // 2} ranks (or use more data)")
        check_batch_size(len(self.train_idx), cfg.batch_size)
        if cfg.batch_size % ranks:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be a "
                            f"multiple of the {ranks} ranks")
        micro = cfg.batch_size // ranks // max(1, cfg.batches_per_allreduce)
        if cfg.batches_per_allreduce < 1 or micro * cfg.batches_per_allreduce * ranks != \
                cfg.batch_size or micro < 2:
            raise UserError(f"--batches-per-allreduce {cfg.batches_per_allreduce} must split each "
                            f"rank's {cfg.batch_size // ranks} patches per step into equal "
                            "micro-batches of at least 2")
        self.labels = labels
        torch.manual_seed(cfg.seed)
        model = build_method(cfg.method, cfg.backbone, in_channels=dataset.channels,
                             **cfg.method_options)
        # NHWC convolutions are about 10 % faster on CPU (oneDNN); values are unchanged.
        self.model = self.dist.prepare_model(model.to(memory_format=torch.channels_last))
        self.steps_per_epoch = len(epoch_batches(self.train_idx, cfg.batch_size, cfg.seed, 0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        mean, std = band_stats(dataset)
        self.transform: ViewTransform | None = None if self.paired else make_view_transform(
            dataset.sensor, dataset.band_names, cfg.input_size, mean=mean, std=std,
            augment=cfg.augment)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if not self.rank0:
            return None
        ckpt_path = self.out / CHECKPOINT
        ckpt = None
        if resume and ckpt_path.exists():
            ckpt = read_checkpoint(ckpt_path)
        elif resume:
            self.log.info("no %s yet: starting from scratch", ckpt_path)
        elif ckpt_path.exists():
            raise UserError(f"{ckpt_path} exists: pass --resume to continue that run, or choose "
                            "another --out")
        self.cfg = self._resolve(cfg, None if ckpt is None else ckpt.get("pretrain", {}))
        if ckpt is not None:
            self._check_resume(ckpt_path, ckpt)
        return ckpt

    def _resolve(self, cfg: PretrainConfig, saved: dict[str, Any] | None) -> PretrainConfig:
        """Schedule options left None: the resumed run's values, else the default for the rank
        count (so a checkpoint resumes under another rank count on its own curve)."""
        ranks = self.dist.size
        defaults = {"nesterov": ranks > 1,
                    "warmup_epochs": default_warmup_epochs(cfg.epochs, ranks),
                    "decay_epochs": (default_decay_epochs(cfg.epochs) if cfg.schedule == "step"
                                     else [])}
        fill = {k: (saved.get(k, LEGACY_SCHEDULE[k]) if saved is not None else v)
                for k, v in defaults.items() if getattr(cfg, k) is None}
        return replace(cfg, **fill)

    def _start(self, ckpt: dict[str, Any] | None) -> None:
        """Collective part of the set-up: rank 0's resolved options, model, optimiser, schedule,
        RNG and history on every rank."""
        chosen = {k: getattr(self.cfg, k) for k in LEGACY_SCHEDULE}
        self.cfg = replace(self.cfg, **self.dist.broadcast_object(chosen))
        cfg = self.cfg
        self.opt = self.dist.wrap_optimizer(
            make_optimizer(self.model.parameters(), cfg, nesterov=bool(cfg.nesterov)),
            self.model, backward_passes=cfg.batches_per_allreduce)
        factor = None
        if cfg.warmup_epochs or cfg.schedule != "cosine":
            factor = WarmupDecay(self.total_steps, cfg.warmup_epochs * self.steps_per_epoch,
                                 start=1.0 / self.dist.size, kind=cfg.schedule,
                                 milestones=[e * self.steps_per_epoch
                                             for e in cfg.decay_epochs or []])
        self.sched = make_scheduler(self.opt, self.total_steps, factor)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            self.history = list(ckpt["history"])
            self.start_epoch = int(ckpt["epoch"])
            self.log.info("resumed %s after epoch %d of %d (written by %s rank(s))",
                          self.out / CHECKPOINT, self.start_epoch, cfg.epochs,
                          ckpt.get("ranks", 1))
        if self.dist.size > 1:
            extra = self.dist.broadcast_state(self.model, self.opt, {
                "scheduler": self.sched.state_dict(), "rng": rng_state(),
                "history": self.history, "start_epoch": self.start_epoch})
            if not self.rank0 and extra is not None:
                self.sched.load_state_dict(extra["scheduler"])
                set_rng_state(extra["rng"])
                self.history, self.start_epoch = extra["history"], extra["start_epoch"]

    @property
    def step_opt(self) -> torch.optim.Optimizer:
        """The optimiser the step calls (kept for callers of the single-process trainer)."""
        return self.opt

    # --- state ------------------------------------------------------------------------------
    def _run_record(self) -> dict[str, Any]:
        rec = asdict(self.cfg)
        for k in ("workers", "progress", "knn_k", "in_memory", "batches_per_allreduce"):
            rec.pop(k)
        return rec

    def data_fingerprint(self) -> dict[str, Any] | None:
        fp = getattr(self.ds, "fingerprint", None)
        return fp() if callable(fp) else None

    def _check_resume(self, path: Path, ckpt: dict[str, Any]) -> None:
        """Refuse a checkpoint made with other options, another model or other data."""
        saved, now = {**LEGACY_OPTIONS, **ckpt.get("pretrain", {})}, self._run_record()
        diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})"
                for k in RESUME_KEYS if saved.get(k) != now[k]]
        if ckpt.get("config") != self.model.config:
            diff.append(f"model {ckpt.get('config')} (now {self.model.config})")
        data_then, data_now = ckpt.get("data"), self.data_fingerprint()
        if data_then is not None and data_now is not None and data_then != data_now:
            changed = ", ".join(f"{k} {data_then.get(k)!r} (now {data_now.get(k)!r})"
                                for k in data_now if data_then.get(k) != data_now.get(k))
            diff.append(f"--data: {changed}")
        if diff:
            raise UserError(f"{path} was made with different options: {'; '.join(diff)}. "
                            "Resume with the same options and data, or choose another --out")

    def save(self, epoch: int) -> None:
        if not self.rank0:
            return
        write_checkpoint(self.out / CHECKPOINT, {
            "config": self.model.config, "pretrain": self._run_record(), "epoch": epoch,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": rng_state(), "history": self.history,
            "band_names": list(self.ds.band_names), "sensor": self.ds.sensor,
            "data": self.data_fingerprint(), "ranks": self.dist.size})
        with atomic_path(self.out / "log.csv") as tmp:
            tmp.write_text(_format_rows(self.history))

    # --- training ---------------------------------------------------------------------------
    def views(self, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return views(self.transform, self.cfg.input_size, x, g)

    def my_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's part of each global mini-batch of the epoch (all of it alone)."""
        batches = epoch_batches(self.train_idx, self.cfg.batch_size, self.cfg.seed, epoch)
        return [shard(b, self.dist.rank, self.dist.size) for b in batches]

    def step(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        """One optimisation step on one mini-batch's views; returns the (local) loss.

        With `batches_per_allreduce` k > 1 the views are cut into k micro-batches whose gradients
        add up (each loss / k) before the one step (and, data parallel, the one allreduce)."""
        k = self.cfg.batches_per_allreduce
        return accumulated_step(self.opt, self.model,
                                zip(x_a.chunk(k), x_b.chunk(k), strict=True), k,
                                self.cfg.base_lr, self.cfg.precision)

    def train_epoch(self, epoch: int) -> tuple[float, int, float, float]:
        """One pass over the shuffled training patches: (mean loss, images, seconds, last lr)."""
        cfg = self.cfg
        batches = self.my_batches(epoch)
        self.model.train()
        total, images, lr, t0 = 0.0, 0, float("nan"), time.perf_counter()
        bar = progress_bar(iter_batches(self.ds, batches, cfg.workers), total=len(batches),
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           disable=not (cfg.progress and self.rank0))
        for i, x in enumerate(bar):
            g = view_generator(cfg.seed, epoch, i, self.dist.rank)
            try:
                loss = self.step(*self.views(x, g))
            except UserError as exc:
                raise UserError(f"epoch {epoch + 1}, batch {i + 1}: {exc}") from None
            lr = self.opt.param_groups[0]["lr"]
            self.sched.step()
            step = epoch * self.steps_per_epoch + i + 1
            self.model.after_step(progress=step / self.total_steps)
            total += float(loss)
            images += x.shape[0] * self.dist.size
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.close()
        mean_loss = self.dist.average(total / max(1, len(batches)), "loss")
        return mean_loss, images, time.perf_counter() - t0, lr

    def recalibrate_bn(self) -> None:
        """Precise BN (see `hpcsrl.features.precise_bn`): BN statistics of the encoder/embedding
        from `precise_bn` clean training patches, at the size evaluation reads them. Every rank
        computes the same statistics from the same patches, so replicas stay identical."""
        n = min(self.cfg.precise_bn, len(self.train_idx))
        if n < 2:
            return
        idx = np.random.default_rng(seed_for(self.cfg.seed, 11)).permutation(self.train_idx)[:n]
        with autocast(self.cfg.precision):
            recalibrate(self.model.embedding, self.model,
                        clean_batches(lambda i: self.ds.read_batch(i)[0], idx,
                                      max(2, 2 * self.cfg.batch_size)))

    @torch.no_grad()
    def monitor(self) -> tuple[float, float]:
        """(embedding std, k-NN accuracy), NaN when there are no monitor patches / labels."""
        if len(self.monitor_idx) < 2:
            return float("nan"), float("nan")

        def read(idx: np.ndarray) -> Tensor:
            return self.ds.read_batch(idx)[0]

        feats = extract({"encoder": self.model.encoder, "embedding": _Embedding(self.model)},
                        read, self.monitor_idx, batch_size=max(2, self.cfg.batch_size),
                        with_stats=False, progress=False, precision=self.cfg.precision)
        std = monitor.embedding_std(torch.from_numpy(feats["embedding"]))
        acc = float("nan")
        if len(self.query):
            pos = {int(v): i for i, v in enumerate(self.monitor_idx)}
            b = [pos[int(v)] for v in self.bank]
            q = [pos[int(v)] for v in self.query]
            acc = monitor.knn_accuracy(feats["encoder"][b], self.labels[self.bank],
                                       feats["encoder"][q], self.labels[self.query],
                                       k=self.cfg.knn_k)
        dim = feats["embedding"].shape[1]
        if std < monitor.collapse_threshold(dim):
            self.log.warning("WARNING: embedding std %.5f is below %.5f (healthy is about "
                             "1/sqrt(%d) = %.4f): the representation is collapsing; check the "
                             "augmentations and --lr", std, monitor.collapse_threshold(dim), dim,
                             1 / math.sqrt(dim))
        return std, acc

    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train the remaining epochs (or up to epoch `stop_after`, e.g. to fit a job's time
        limit); checkpoint and log after each. Returns the log rows. Releases the folder lock."""
        try:
            return self._run(stop_after)
        finally:
            self.lock.release()

    def _run(self, stop_after: int | None) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.start_epoch >= cfg.epochs:
            self.log.info("all %d epochs already done (%s)", cfg.epochs, self.out / CHECKPOINT)
            return self.history
        self.log.info("pre-training %s/%s on %d patches (%d bands, %s): %d epochs x %d "
                      "iterations, batch %d%s, input %d, lr %g", cfg.method, cfg.backbone,
                      len(self.train_idx), self.ds.channels, self.ds.sensor, cfg.epochs,
                      self.steps_per_epoch, cfg.batch_size,
                      f" ({self.dist.size} ranks x {cfg.batch_size // self.dist.size}, "
                      f"{self.dist.describe()['kind']})" if self.dist.size > 1 else "",
                      cfg.input_size, cfg.base_lr)
        last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        for epoch in range(self.start_epoch, last):
            loss, images, seconds, lr = self.train_epoch(epoch)
            self.recalibrate_bn()
            std, acc = self.monitor() if self.rank0 else (float("nan"), float("nan"))
            row = {"epoch": epoch + 1, "loss": loss, "lr": lr,
                   "emb_std": std, "knn_acc": acc, "seconds": seconds,
                   "images_per_s": images / seconds if seconds > 0 else float("nan")}
            self.history.append(row)
            self.save(epoch + 1)
            self.log.info("epoch %d/%d  loss %.4f  lr %.4g  emb_std %s  knn_acc %s  %.1f s "
                          "(%.1f img/s)", epoch + 1, cfg.epochs, loss, row["lr"],
                          "-" if math.isnan(std) else f"{std:.4f}",
                          "-" if math.isnan(acc) else f"{acc:.3f}", seconds,
                          row["images_per_s"])
        return self.history
