"""The few-label protocol end to end: split, features, freeze / fine-tune / k-NN floor, report.

Three disjoint parts (`hpcsrl.data.splits`): every head is trained on a labelled subset of the
pool, every choice (input size, probe weight decay and epochs, k of the k-NN floor) is made on
the validation part, and the test part is scored once, for the chosen setting only. Works on a
plain `read(indices) -> (n, C, P, P)` function and label arrays, so it is independent of the HDF5
dataset class and of the model registry (the CLI and the benchmarks wire those in).
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpcsrl.data.splits import (
    Layout,
    Split,
    SplitSpec,
    make_split,
    nested_label_fractions,
    stratified_subsample,
)
from hpcsrl.eval import metrics
from hpcsrl.eval.plots import plot_confusion, plot_tsne, tsne_embed
from hpcsrl.eval.report import (
    REPORT_COLUMNS,
    SELECTION_COLUMNS,
    write_confusion_csv,
    write_csv,
)
from hpcsrl.eval.train import FitConfig, Head, fine_tune, fit_linear, predict
from hpcsrl.features.extract import (
    BatchReader,
    as_tensor,
    extract,
    state_digest,
    verify_unchanged,
)
from hpcsrl.features.knn import knn_predict
from hpcsrl.features.precise_bn import clean_batches, recalibrate
from hpcsrl.features.stages import StagePooled, last_stage_columns
from hpcsrl.fileio import write_json
from hpcsrl.precision import autocast

# "freeze": linear probe on the pooled last stage (the classic protocol); "freeze-stages": linear
# probe on the pooled last k stages concatenated, k chosen on validation (hpcsrl.features.stages).
MODES = ("freeze", "freeze-stages", "finetune")
KNN_NAME = "channel-stats"
PER_CLASS_COLUMNS = ("encoder", "mode", "fraction", "class", "precision", "recall", "f1",
                     "support")


@dataclass
class LabelledData:
    """What the protocol needs from a dataset."""

    read: BatchReader
    labels: np.ndarray                      # (N,) int, -1 = unknown or several labels
    class_names: list[str]
    multi_hot: np.ndarray | None = None     # (N, K) 0/1, only when samples carry several labels


@dataclass
class EvalSpec:
    modes: tuple[str, ...] = MODES
    fractions: tuple[float, ...] = (0.1, 0.2, 0.5)
    test_fraction: float = 0.2              # only used when no split is given
    val_fraction: float = 0.1               # only used when no split is given
    seed: int = 0
    max_samples: int | None = None          # stratified subsample of every part first
    knn_floor: bool = True
    knn_ks: tuple[int, ...] = (5, 10, 20)   # k of the floor, chosen on validation
    tsne: bool = True
    tsne_points: int = 2000
    feature_batch: int = 256
    input_sizes: tuple[int | None, ...] = (None,)   # candidates (None: the patch size)
    probe_weight_decays: tuple[float, ...] = (0.0,)  # linear-probe candidates
    probe_epochs: tuple[int, ...] = ()      # linear-probe candidates (empty: fit.epochs)
    probe_stages: tuple[int, ...] = (1, 2, 3)  # "freeze-stages" candidates: last k stages
    bn_samples: int = 2048                  # pool patches for BN statistics at an input size
    score_test: bool = True                 # False: validation only (choosing a recipe)
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
    that size on `spec.bn_samples` clean patches of the training pool (never the validation or
    test part, no labels).

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
        with autocast(spec.fit.precision):
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


def size_label(size: int | None) -> str:
    return "native" if size is None else f"{size}px"


@dataclass
class Parts:
    """Sample indices the protocol uses: the labelled subsets and the scored parts."""

    train: dict[float, np.ndarray]
    val: np.ndarray                 # validation samples with some label
    test: np.ndarray                # test samples with some label
    pool: np.ndarray                # for BatchNorm statistics (no labels used)


def protocol_parts(data: LabelledData, spec: EvalSpec, split: Split | None) -> tuple[Parts, Split]:
    """The split (drawn per sample from the labels when none is given), cut to `max_samples`."""
    if split is None:
        split = make_split(Layout.from_arrays(data.labels, data.multi_hot),
                           SplitSpec(seed=spec.seed, test_fraction=spec.test_fraction,
                                     val_fraction=spec.val_fraction))
    keys = split.strata
    if len(keys) != len(data.labels):
        raise ValueError(f"split of {len(keys)} patches for data of {len(data.labels)}")
    test, val, pool = split.test, split.val, split.pool
    if spec.max_samples:
        keep = stratified_subsample(keys, spec.max_samples, split.spec.seed)
        test, val = np.intersect1d(test, keep), np.intersect1d(val, keep)
        pool = np.intersect1d(pool, np.union1d(keep, np.flatnonzero(keys < 0)))
    train = nested_label_fractions(keys, pool, list(spec.fractions), split.spec.seed)
    labelled = keys >= 0
    if not spec.score_test:
        test = test[:0]
    return Parts(train, val[labelled[val]], test[labelled[test]], pool), split


class _Scorer:
    """Metrics of predictions on one part (single-label over samples with one label, multi-label
    micro/macro F1 over every sample with any label)."""

    def __init__(self, data: LabelledData, idx: np.ndarray, multilabel: bool) -> None:
        self.data, self.idx = data, idx
        self.single = data.labels[idx] >= 0
        self.multi = (np.asarray(data.multi_hot)[idx].any(axis=1) if multilabel
                      else np.zeros(len(idx), bool))
        self.multilabel = multilabel

    def __call__(self, pred: np.ndarray, ml_pred: np.ndarray | None) -> dict:
        k = len(self.data.class_names)
        if len(self.idx) == 0:  # not scored (validation-only runs)
            nan = float("nan")
            return {"oa": nan, "kappa": nan, "macro_f1": nan, "n": 0, "_rep": None}
        rep = metrics.classification_report(self.data.labels[self.idx][self.single],
                                            np.asarray(pred)[self.single], k)
        out = {"oa": rep["oa"], "kappa": rep["kappa"], "macro_f1": rep["macro_f1"], "_rep": rep,
               "n": int(self.single.sum())}
        if self.multilabel and ml_pred is not None:
            out.update(metrics.multilabel_f1(np.asarray(self.data.multi_hot)[self.idx][self.multi],
                                             np.asarray(ml_pred)[self.multi]))
            out["n"] = int(self.multi.sum())
        return out

    def key(self, scores: dict) -> float:
        """What selection maximises: multi-label micro F1 on multi-label data, else OA."""
        return scores.get("ml_f1_micro", scores["oa"]) if self.multilabel else scores["oa"]


class _Recorder:
    """Collects report rows and writes each run's confusion CSV/PNG as soon as it finishes."""

    def __init__(self, data: LabelledData, out: Path, log: logging.Logger) -> None:
        self.data, self.out, self.log = data, out, log
        self.rows: list[dict] = []
        self.per_class: list[dict] = []
        self.selection: list[dict] = []

    def candidate(self, encoder: str, mode: str, fraction: float, setting: str, val: dict,
                  seconds: float) -> None:
        self.selection.append({"encoder": encoder, "mode": mode, "fraction": fraction,
                               "setting": setting, "val_oa": val["oa"],
                               "val_macro_f1": val["macro_f1"],
                               "val_ml_f1_micro": val.get("ml_f1_micro"),
                               "seconds": round(seconds, 2)})

    def add(self, encoder: str, mode: str, fraction: float, n_train: int, seconds: float,
            setting: str, n_candidates: int, val: dict, test: dict) -> dict:
        names = self.data.class_names
        rep = test["_rep"]
        row = {"encoder": encoder, "mode": mode, "fraction": fraction, "selected": setting,
               "candidates": n_candidates, "oa": test["oa"], "kappa": test["kappa"],
               "macro_f1": test["macro_f1"], "ml_f1_micro": test.get("ml_f1_micro"),
               "ml_f1_macro": test.get("ml_f1_macro"), "val_oa": val["oa"],
               "val_macro_f1": val["macro_f1"], "val_ml_f1_micro": val.get("ml_f1_micro"),
               "n_train": n_train, "n_val": val["n"], "n_test": test["n"],
               "seconds": round(seconds, 2)}
        self.rows.append(row)
        pc = rep["per_class"] if rep is not None else {}
        for c, name in enumerate(names if rep is not None else []):
            self.per_class.append({"encoder": encoder, "mode": mode, "fraction": fraction,
                                   "class": name, "precision": pc["precision"][c],
                                   "recall": pc["recall"][c], "f1": pc["f1"][c],
                                   "support": int(pc["support"][c])})
        if rep is not None:
            base = f"confusion_{run_name(encoder, mode, fraction)}"  # may hold dots: no suffix
            write_confusion_csv(self.out / f"{base}.csv", rep["confusion"], names)
            plot_confusion(rep["confusion"], names,
                           f"{encoder} {mode} {fraction:.0%} labels: test OA {rep['oa']:.3f}",
                           self.out / f"{base}.png")
        self.log.info("%-14s %-8s %4.0f%%  val OA %.4f  test OA %.4f  kappa %.4f  macro-F1 %.4f"
                      "  [%s]  (%d train, %.1f s)", encoder, mode, fraction * 100, val["oa"],
                      test["oa"], test["kappa"], test["macro_f1"], setting, n_train, seconds)
        return row


def _tsne(feats: np.ndarray, labels: np.ndarray, names: list[str], title: str, path: Path,
          spec: EvalSpec) -> None:
    keep = labels >= 0
    xy, lab = tsne_embed(feats[keep], labels[keep], spec.tsne_points, spec.seed)
    plot_tsne(xy, lab, names, title, path)


def _best(candidates: list[tuple[float, int]]) -> int:
    """Index of the highest validation score; ties: the earliest candidate (grid order)."""
    return max(range(len(candidates)), key=lambda i: (candidates[i][0], -i))


def run_protocol(data: LabelledData, encoders: Mapping[str, nn.Module], spec: EvalSpec,
                 out_dir: str | Path, log: logging.Logger | None = None,
                 split: Split | None = None) -> list[dict]:
    """Evaluate every encoder in every mode at every label fraction (+ the k-NN floor).

    Writes into `out_dir`: report.csv (one row per encoder x mode x fraction: the setting chosen
    on validation, its validation figures and the test figures), selection.csv (every candidate's
    validation figures), per_class.csv, parts.json, confusion_*.csv/png and tsne_*.png. Freeze
    runs never touch the encoder (checked by digest); fine-tune runs work on deep copies, so the
    caller's encoders are unchanged afterwards either way.
    """
    log = log or logging.getLogger("hpcsrl.eval")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in spec.modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
    if not spec.probe_stages or min(spec.probe_stages) < 1:
        raise ValueError(f"probe_stages must be counts >= 1 (got {spec.probe_stages})")
    # One feature pass serves both freeze modes: the last stages' pooled outputs, concatenated.
    n_stages = max(spec.probe_stages) if "freeze-stages" in spec.modes else 1
    labels = np.asarray(data.labels, dtype=np.int64)
    k = len(data.class_names)
    if labels.max(initial=-1) >= k:
        raise ValueError(f"labels reach {labels.max()} but only {k} class names are given")
    ml = data.multi_hot if is_multilabel(data.multi_hot) else None
    data = LabelledData(data.read, labels, data.class_names, ml)
    parts, split = protocol_parts(data, spec, split)
    write_json(out / "parts.json", {
        "split": split.record(), "max_samples": spec.max_samples,
        "val": parts.val.tolist(), "test": parts.test.tolist(),
        "train": {f"{f:g}": idx.tolist() for f, idx in parts.train.items()}})
    log.info("split %s (%s): %d validation, %d test, %d pool patches; labelled %s", split.path
             or "(per sample)", split.grouping, len(parts.val), len(parts.test), len(parts.pool),
             ", ".join(f"{f:g}: {len(i)}" for f, i in parts.train.items()))
    val_score = _Scorer(data, parts.val, ml is not None)
    test_score = _Scorer(data, parts.test, ml is not None)
    rec = _Recorder(data, out, log)
    used = np.unique(np.concatenate([parts.val, parts.test, *parts.train.values()]))
    pos = {int(i): p for p, i in enumerate(used)}          # sample index -> row in feature arrays

    def rows_of(idx: np.ndarray) -> np.ndarray:
        return np.fromiter((pos[int(i)] for i in idx), dtype=np.int64, count=len(idx))

    val_rows, test_rows = rows_of(parts.val), rows_of(parts.test)
    digests = {name: state_digest(enc) for name, enc in encoders.items()}
    sized: dict[int | None, Mapping[str, nn.Module]] = {}
    sized_digests: dict[int | None, dict[str, str]] = {}
    feats: dict[int | None, dict[str, np.ndarray]] = {}
    dims: dict[str, list[int]] = {}     # encoder -> widths of its feature parts (last: classic)
    for size in spec.input_sizes:
        sized[size] = encoders if size is None else resized_encoders(
            encoders, data.read, parts.pool, size, spec)
        sized_digests[size] = {name: state_digest(e) for name, e in sized[size].items()}
        t0 = time.perf_counter()
        staged = sized[size] if n_stages == 1 else {
            name: StagePooled(e, n_stages) for name, e in sized[size].items()}
        feats[size] = extract(staged, data.read, used, spec.feature_batch,
                              with_stats=spec.knn_floor and "channel_stats" not in
                              next(iter(feats.values()), {}), progress=spec.fit.progress,
                              precision=spec.fit.precision)
        log.info("features of %d samples from %d encoder(s) at %s in %.1f s", len(used),
                 len(encoders), size_label(size), time.perf_counter() - t0)
        dims.update({name: getattr(e, "dims", None) or [feats[size][name].shape[1]]
                     for name, e in staged.items()})
        for name, enc in sized[size].items():
            verify_unchanged(enc, sized_digests[size][name], f"encoder {name!r} (features)")
    first = spec.input_sizes[0]
    epochs_grid = spec.probe_epochs or (spec.fit.epochs,)

    def feat(size: int | None, name: str, stages: int = 1) -> np.ndarray:
        """Frozen features of every used sample: the pooled last `stages` stages."""
        return feats[size][name][:, last_stage_columns(dims[name], stages)]

    fitted: dict[tuple, tuple[Head, dict]] = {}  # both freeze modes share the 1-stage probes

    def choose_probe(name: str, f: float, idx: np.ndarray, sizes: Sequence[int | None],
                     mode: str | None) -> tuple[Head, str, tuple[int | None, int], dict, int]:
        """The linear probe of `name` on the labelled subset `idx` whose (input size, stages,
        weight decay, epochs) scores best on validation, with its setting, (input size, stages),
        validation scores and the number of candidates; the candidates are listed in the report
        under `mode` ("freeze": the last stage only; "freeze-stages": `spec.probe_stages`)."""
        stages = spec.probe_stages if mode == "freeze-stages" else (1,)
        grid = list(itertools.product(sizes, stages, spec.probe_weight_decays, epochs_grid))
        tried: list[tuple[float, int]] = []
        heads: list[tuple[Head, dict]] = []
        for size, st, wd, ep in grid:
            tc = time.perf_counter()
            key = (name, f, size, st, wd, ep)
            if key not in fitted:
                cfg = replace(spec.fit, weight_decay=wd, epochs=ep)
                head = fit_linear(feat(size, name, st)[rows_of(idx)], labels[idx], k, cfg,
                                  None if ml is None else ml[idx])
                fitted[key] = head, val_score(*predict(head, feat(size, name, st)[val_rows]))
            head, v = fitted[key]
            if mode is not None:
                rec.candidate(name, mode, f, _setting(size, wd, ep, st, mode), v,
                              time.perf_counter() - tc)
            tried.append((val_score.key(v), len(tried)))
            heads.append((head, v))
        b = _best(tried)
        size, st, wd, ep = grid[b]
        return heads[b][0], _setting(size, wd, ep, st, mode), (size, st), heads[b][1], len(grid)

    for name, enc in encoders.items():
        probes: dict[tuple[float, int | None], Head] = {}  # (fraction, size) -> chosen probe
        if spec.tsne and len(parts.test):
            _tsne(feat(first, name)[test_rows], labels[parts.test], data.class_names,
                  f"t-SNE of frozen {name} features (test set)", out / f"tsne_{slug(name)}.png",
                  spec)
        for mode in (m for m in ("freeze", "freeze-stages") if m in spec.modes):
            for f, idx in parts.train.items():
                t = time.perf_counter()
                head, setting, (size, st), v, n_grid = choose_probe(name, f, idx,
                                                                    spec.input_sizes, mode)
                if mode == "freeze":
                    probes[(f, size)] = head
                test = test_score(*predict(head, feat(size, name, st)[test_rows]))
                rec.add(name, mode, f, len(idx), time.perf_counter() - t, setting, n_grid, v,
                        test)
            for size in spec.input_sizes:
                verify_unchanged(sized[size][name], sized_digests[size][name],
                                 f"encoder {name!r}")
        if "finetune" in spec.modes:
            for f, idx in parts.train.items():
                t = time.perf_counter()
                best: tuple[float, int | None, nn.Module, Head, dict] | None = None
                for size in spec.input_sizes:
                    tc = time.perf_counter()
                    tuned = copy.deepcopy(sized[size][name])
                    start = None
                    if spec.fit.finetune_head == "probe":  # the freeze mode's, else chosen now
                        start = probes.get((f, size)) or choose_probe(name, f, idx, (size,),
                                                                      None)[0]
                    head = fine_tune(tuned, dims[name][-1], data.read, idx, labels, k, spec.fit,
                                     ml, init_feats=feat(size, name)[rows_of(idx)], head=start)
                    vf = extract({name: tuned}, data.read, parts.val, spec.feature_batch,
                                 with_stats=False, progress=spec.fit.progress,
                                 precision=spec.fit.precision)[name]
                    v = val_score(*predict(head, vf))
                    rec.candidate(name, "finetune", f, size_label(size), v,
                                  time.perf_counter() - tc)
                    if best is None or val_score.key(v) > best[0]:
                        best = (val_score.key(v), size, tuned, head, v)
                _, size, tuned, head, v = best
                test_feats = extract({name: tuned}, data.read, parts.test, spec.feature_batch,
                                     with_stats=False, progress=spec.fit.progress,
                                     precision=spec.fit.precision)[name] \
                    if len(parts.test) else np.zeros((0, 1), np.float32)
                test = test_score(*predict(head, test_feats))
                rec.add(name, "finetune", f, len(idx), time.perf_counter() - t,
                        size_label(size), len(spec.input_sizes), v, test)
                if spec.tsne and len(parts.test) and f == max(parts.train):
                    _tsne(test_feats, labels[parts.test], data.class_names,
                          f"t-SNE of fine-tuned {name} features ({f:.0%} labels, test set)",
                          out / f"tsne_{slug(name)}_finetuned.png", spec)
            verify_unchanged(enc, digests[name], f"encoder {name!r} (fine-tune copies)")
    if spec.knn_floor:
        stats = feats[first]["channel_stats"]
        for f, idx in parts.train.items():
            t = time.perf_counter()
            tr = rows_of(idx)

            def knn(rows: np.ndarray, kk: int, tr: np.ndarray = tr, idx: np.ndarray = idx
                    ) -> tuple[np.ndarray, np.ndarray | None]:
                if len(rows) == 0:
                    return np.zeros(0, np.int64), None
                pred = knn_predict(stats[tr], labels[idx], stats[rows], kk)
                return pred, (None if ml is None else knn_predict(stats[tr], ml[idx],
                                                                  stats[rows], kk))

            tried = []
            for kk in spec.knn_ks:
                tc = time.perf_counter()
                v = val_score(*knn(val_rows, kk))
                rec.candidate(KNN_NAME, "knn", f, f"k {kk}", v, time.perf_counter() - tc)
                tried.append((val_score.key(v), len(tried)))
            kk = spec.knn_ks[_best(tried)]
            rec.add(KNN_NAME, "knn", f, len(idx), time.perf_counter() - t, f"k {kk}",
                    len(spec.knn_ks), val_score(*knn(val_rows, kk)),
                    test_score(*knn(test_rows, kk)))

    write_csv(out / "report.csv", rec.rows, REPORT_COLUMNS)
    write_csv(out / "selection.csv", rec.selection, SELECTION_COLUMNS)
    write_csv(out / "per_class.csv", rec.per_class, PER_CLASS_COLUMNS)
    return rec.rows


def _setting(size: int | None, weight_decay: float, epochs: int, stages: int = 1,
             mode: str | None = "freeze") -> str:
    staged = f", last {stages} stage{'s' if stages > 1 else ''}" if mode == "freeze-stages" else ""
    return f"{size_label(size)}{staged}, wd {weight_decay:g}, {epochs} ep"
