"""The few-label protocol end to end: split, features, freeze / fine-tune / k-NN floor, report.

Works on a plain `read(indices) -> (n, C, P, P)` function and label arrays, so it is independent of
the HDF5 dataset class and of the model registry (the CLI and the benchmark wire those in).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpcsrl.eval import metrics
from hpcsrl.eval.plots import plot_confusion, plot_tsne, tsne_embed
from hpcsrl.eval.report import REPORT_COLUMNS, write_confusion_csv, write_csv
from hpcsrl.eval.splits import nested_label_fractions, stratified_subsample, stratified_test_split
from hpcsrl.eval.train import FitConfig, fine_tune, fit_linear, predict
from hpcsrl.features.extract import (
    BatchReader,
    as_tensor,
    extract,
    state_digest,
    verify_unchanged,
)
from hpcsrl.features.knn import knn_predict
from hpcsrl.features.precise_bn import clean_batches, recalibrate
from hpcsrl.fileio import write_json

MODES = ("freeze", "finetune")
KNN_NAME = "channel-stats"
PER_CLASS_COLUMNS = ("encoder", "mode", "fraction", "class", "precision", "recall", "f1",
                     "support")


@dataclass
class LabelledData:
    """What the protocol needs from a dataset."""

    read: BatchReader
    labels: np.ndarray                      # (N,) int, -1 = unknown (excluded)
    class_names: list[str]
    multi_hot: np.ndarray | None = None     # (N, K) 0/1, only when samples carry several labels


@dataclass
class EvalSpec:
    modes: tuple[str, ...] = MODES
    fractions: tuple[float, ...] = (0.1, 0.2, 0.5)
    test_fraction: float = 0.2
    seed: int = 0
    max_samples: int | None = None          # stratified subsample of the labelled set first
    knn_floor: bool = True
    tsne: bool = True
    tsne_points: int = 2000
    feature_batch: int = 256
    input_size: int | None = None           # resize patches to this side before every encoder
    bn_samples: int = 2048                  # pool patches for BN statistics at input_size
    fit: FitConfig = field(default_factory=FitConfig)


class ResizedInput(nn.Module):
    """An encoder fed patches resized (bilinear, antialiased) to `size` x `size` first.

    ResNets with the ImageNet stem reduce their input 32-fold, so a 64-px chip ends as 2 x 2
    cells; the source paper feeds EuroSAT up-sampled to 224 px. Resizing inside the encoder
    keeps the channel-statistics floor on the original pixels.
    """

    def __init__(self, encoder: nn.Module, size: int) -> None:
        super().__init__()
        self.encoder, self.size = encoder, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.encoder(x)


def resized_encoders(encoders: Mapping[str, nn.Module], read: BatchReader, pool: np.ndarray,
                     size: int, spec: EvalSpec) -> dict[str, nn.Module]:
    """Copies of `encoders` behind `ResizedInput(size)`, BatchNorm statistics re-estimated at
    that size on `spec.bn_samples` clean patches of the training pool (never the test set, no
    labels).

    Running statistics gathered at another input size describe other activations; without this
    the frozen features at the new size are skewed (EuroSAT, 32-px pre-training: OA at 128 px
    depends on it).
    """
    rng = np.random.default_rng(spec.seed)
    n = min(spec.bn_samples, len(pool))
    cal = np.sort(rng.choice(pool, n, replace=False)) if n else pool[:0]
    out: dict[str, nn.Module] = {}
    for name, enc in encoders.items():
        wrapped = ResizedInput(copy.deepcopy(enc), size)
        recalibrate(wrapped, wrapped,
                    clean_batches(lambda i: as_tensor(read(i)), cal, spec.feature_batch))
        out[name] = wrapped.train(enc.training)
    return out


def is_multilabel(multi_hot: np.ndarray | None) -> bool:
    """True when some sample carries more than one label (else single-label metrics suffice)."""
    return multi_hot is not None and bool((np.asarray(multi_hot).sum(axis=1) > 1).any())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def run_name(encoder: str, mode: str, fraction: float) -> str:
    return f"{slug(encoder)}_{mode}_{round(fraction * 100, 3):g}pct"


class _Recorder:
    """Collects report rows and writes each run's confusion CSV/PNG as soon as it finishes."""

    def __init__(self, data: LabelledData, test: np.ndarray, out: Path,
                 log: logging.Logger) -> None:
        self.data, self.test, self.out, self.log = data, test, out, log
        self.rows: list[dict] = []
        self.per_class: list[dict] = []

    def add(self, encoder: str, mode: str, fraction: float, n_train: int, seconds: float,
            pred: np.ndarray, ml_pred: np.ndarray | None = None) -> dict:
        names = self.data.class_names
        rep = metrics.classification_report(self.data.labels[self.test], pred, len(names))
        row = {"encoder": encoder, "mode": mode, "fraction": fraction, "oa": rep["oa"],
               "kappa": rep["kappa"], "macro_f1": rep["macro_f1"], "n_train": n_train,
               "n_test": len(self.test), "seconds": round(seconds, 2)}
        if ml_pred is not None and self.data.multi_hot is not None:
            row.update(metrics.multilabel_f1(self.data.multi_hot[self.test], ml_pred))
        self.rows.append(row)
        pc = rep["per_class"]
        for c, name in enumerate(names):
            self.per_class.append({"encoder": encoder, "mode": mode, "fraction": fraction,
                                   "class": name, "precision": pc["precision"][c],
                                   "recall": pc["recall"][c], "f1": pc["f1"][c],
                                   "support": int(pc["support"][c])})
        base = self.out / f"confusion_{run_name(encoder, mode, fraction)}"
        write_confusion_csv(base.with_suffix(".csv"), rep["confusion"], names)
        plot_confusion(rep["confusion"], names,
                       f"{encoder} {mode} {fraction:.0%} labels: OA {rep['oa']:.3f}",
                       base.with_suffix(".png"))
        self.log.info("%-14s %-8s %4.0f%%  OA %.4f  kappa %.4f  macro-F1 %.4f  (%d train, %.1f s)",
                      encoder, mode, fraction * 100, rep["oa"], rep["kappa"], rep["macro_f1"],
                      n_train, seconds)
        return row


def _tsne(feats: np.ndarray, labels: np.ndarray, names: list[str], title: str, path: Path,
          spec: EvalSpec) -> None:
    xy, lab = tsne_embed(feats, labels, spec.tsne_points, spec.seed)
    plot_tsne(xy, lab, names, title, path)


def run_protocol(data: LabelledData, encoders: Mapping[str, nn.Module], spec: EvalSpec,
                 out_dir: str | Path, log: logging.Logger | None = None) -> list[dict]:
    """Evaluate every encoder in every mode at every label fraction (+ the k-NN floor).

    Writes into `out_dir`: report.csv, per_class.csv, split.json, confusion_*.csv/png and
    tsne_*.png. Freeze runs never touch the encoder (checked by digest); fine-tune runs work on
    deep copies, so the caller's encoders are unchanged afterwards either way. With
    `spec.input_size` every encoder is evaluated as a resized copy (see `resized_encoders`).
    """
    log = log or logging.getLogger("hpcsrl.eval")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in spec.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
    labels = np.asarray(data.labels, dtype=np.int64)
    k = len(data.class_names)
    if labels.max(initial=-1) >= k:
        raise ValueError(f"labels reach {labels.max()} but only {k} class names are given")

    candidates = labels.copy()
    if spec.max_samples:
        keep = stratified_subsample(labels, spec.max_samples, spec.seed)
        candidates = np.full_like(labels, -1)
        candidates[keep] = labels[keep]
    pool, test = stratified_test_split(candidates, spec.test_fraction, spec.seed)
    subsets = nested_label_fractions(candidates, pool, list(spec.fractions), spec.seed)
    write_json(out / "split.json", {
        "seed": spec.seed, "test_fraction": spec.test_fraction, "n_pool": int(len(pool)),
        "test": test.tolist(), "train": {f"{f:g}": idx.tolist() for f, idx in subsets.items()}})
    if spec.input_size:
        encoders = resized_encoders(encoders, data.read, pool, spec.input_size, spec)
        log.info("encoders fed %d-px patches; BatchNorm statistics from %d pool patches",
                 spec.input_size, min(spec.bn_samples, len(pool)))
    used = np.union1d(test, np.unique(np.concatenate(list(subsets.values()))))
    pos = {int(i): p for p, i in enumerate(used)}          # sample index -> row in feature arrays

    def rows_of(idx: np.ndarray) -> np.ndarray:
        return np.fromiter((pos[int(i)] for i in idx), dtype=np.int64, count=len(idx))

    test_rows = rows_of(test)
    ml = data.multi_hot if is_multilabel(data.multi_hot) else None
    rec = _Recorder(LabelledData(data.read, labels, data.class_names, ml), test, out, log)

    digests = {name: state_digest(enc) for name, enc in encoders.items()}
    t0 = time.perf_counter()
    feats = extract(encoders, data.read, used, spec.feature_batch, with_stats=spec.knn_floor,
                    progress=spec.fit.progress)
    log.info("features of %d samples from %d encoder(s) in %.1f s", len(used), len(encoders),
             time.perf_counter() - t0)
    for name, enc in encoders.items():
        verify_unchanged(enc, digests[name], f"encoder {name!r} (feature extraction)")

    for name, enc in encoders.items():
        if spec.tsne:
            _tsne(feats[name][test_rows], labels[test], data.class_names,
                  f"t-SNE of frozen {name} features (test set)", out / f"tsne_{slug(name)}.png",
                  spec)
        if "freeze" in spec.modes:
            for f, idx in subsets.items():
                t = time.perf_counter()
                head = fit_linear(feats[name][rows_of(idx)], labels[idx], k, spec.fit,
                                  None if ml is None else ml[idx])
                pred, ml_pred = predict(head, feats[name][test_rows])
                rec.add(name, "freeze", f, len(idx), time.perf_counter() - t, pred, ml_pred)
            verify_unchanged(enc, digests[name], f"encoder {name!r}")
        if "finetune" in spec.modes:
            for f, idx in subsets.items():
                t = time.perf_counter()
                tuned = copy.deepcopy(enc)
                head = fine_tune(tuned, feats[name].shape[1], data.read, idx, labels, k,
                                 spec.fit, ml, init_feats=feats[name][rows_of(idx)])
                test_feats = extract({name: tuned}, data.read, test, spec.feature_batch,
                                     with_stats=False, progress=spec.fit.progress)[name]
                pred, ml_pred = predict(head, test_feats)
                rec.add(name, "finetune", f, len(idx), time.perf_counter() - t, pred, ml_pred)
                if spec.tsne and f == max(subsets):
                    _tsne(test_feats, labels[test], data.class_names,
                          f"t-SNE of fine-tuned {name} features ({f:.0%} labels, test set)",
                          out / f"tsne_{slug(name)}_finetuned.png", spec)
            verify_unchanged(enc, digests[name], f"encoder {name!r} (fine-tune copies)")
    if spec.knn_floor:
        stats = feats["channel_stats"]
        for f, idx in subsets.items():
            t = time.perf_counter()
            pred = knn_predict(stats[rows_of(idx)], labels[idx], stats[test_rows])
            ml_pred = None if ml is None else knn_predict(stats[rows_of(idx)], ml[idx],
                                                          stats[test_rows])
            rec.add(KNN_NAME, "knn", f, len(idx), time.perf_counter() - t, pred, ml_pred)

    write_csv(out / "report.csv", rec.rows, REPORT_COLUMNS)
    write_csv(out / "per_class.csv", rec.per_class, PER_CLASS_COLUMNS)
    return rec.rows
