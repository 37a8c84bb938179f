"""Classification metrics in plain numpy (no sklearn at run time); tests check them vs sklearn."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0 convention)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, actual)
    f1 = _safe_div(2 * tp, predicted + actual)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def overall_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def cohen_kappa(cm: np.ndarray) -> float:
    """Agreement beyond chance: (p_o - p_e) / (1 - p_e)."""
    total = cm.sum()
    if total == 0:
        return 0.0
    p_o = np.trace(cm) / total
    p_e = float((cm.sum(axis=0) * cm.sum(axis=1)).sum()) / float(total) ** 2
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def macro_f1(cm: np.ndarray, present_only: bool = True) -> float:
    """Mean F1 over classes; by default only classes present in y_true or y_pred count.

    sklearn averages over the union of labels seen in y_true and y_pred; with `present_only` the
    result matches `f1_score(average="macro")` when called without an explicit label list.
    """
    f1 = per_class_scores(cm)["f1"]
    if present_only:
        seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
        return float(f1[seen].mean()) if seen.any() else 0.0
    return float(f1.mean())


def multilabel_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 for (N, K) 0/1 arrays (macro over all K labels, zero when undefined)."""
    t = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"multi-label arrays must both be (N, K); got {t.shape} and {p.shape}")
    tp = (t & p).sum(axis=0).astype(np.float64)
    fp = (~t & p).sum(axis=0).astype(np.float64)
    fn = (t & ~p).sum(axis=0).astype(np.float64)
    micro = _safe_div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    per_label = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {"ml_f1_micro": float(micro), "ml_f1_macro": float(per_label.mean())}


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Everything the evaluation report needs for one single-label run."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    return {
        "confusion": cm,
        "oa": overall_accuracy(cm),
        "kappa": cohen_kappa(cm),
        "macro_f1": macro_f1(cm),
        "per_class": per_class_scores(cm),
    }
