"""Report files: the summary CSV (one row per encoder x mode x fraction), per-class scores,
confusion matrices, and the table printed at the end of a run.

`seconds` is the wall time of one row: for freeze the training and validation of every candidate
head on features extracted once beforehand (that shared pass is logged separately), for
fine-tune the training and the validation/test feature passes, for the k-NN floor every
candidate k. `selected` is the setting chosen on validation (`val_*`) among `candidates`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from hpcsrl.fileio import atomic_path

# Test figures first, then the validation figures of the setting chosen on validation.
REPORT_COLUMNS = ("encoder", "mode", "fraction", "oa", "kappa", "macro_f1", "ml_f1_micro",
                  "ml_f1_macro", "val_oa", "val_macro_f1", "val_ml_f1_micro", "selected",
                  "candidates", "n_train", "n_val", "n_test", "seconds")
SELECTION_COLUMNS = ("encoder", "mode", "fraction", "setting", "val_oa", "val_macro_f1",
                     "val_ml_f1_micro", "seconds")


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}"
    return str(value)


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Atomic CSV with a fixed column order; missing values are left empty."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_fmt(row.get(c)) for c in columns])


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_confusion_csv(path: str | os.PathLike, cm: np.ndarray, class_names: list[str]) -> None:
    """Rows = true class, columns = predicted class, with class names as header and first column."""
    rows = [{"true\\pred": name, **{n: int(v) for n, v in zip(class_names, cm[i], strict=True)}}
            for i, name in enumerate(class_names)]
    write_csv(path, rows, ["true\\pred", *class_names])


def format_table(rows: Sequence[dict], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """A fixed-width text table of the report rows (columns with no values are dropped)."""
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]

    def cell(row: dict, col: str) -> str:
        v = row.get(col)
        if col == "fraction" and isinstance(v, float):
            return f"{v:.0%}"
        if col == "seconds" and isinstance(v, float):
            return f"{v:.1f}"
        return _fmt(v)

    cells = [[cell(r, c) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "-" * len(line), *body])
