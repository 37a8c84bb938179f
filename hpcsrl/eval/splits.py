"""Stratified splits: a held-out test set, then nested label fractions of the remaining pool.

The fractions are nested (the 10 % set is inside the 20 % set, which is inside the 50 % set) so a
gain from more labels is never confused with a luckier draw of the first few.
"""

from __future__ import annotations

import numpy as np

from hpcsrl.errors import UserError


def _per_class_permutations(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Indices of each class (labels >= 0), each shuffled independently."""
    classes = np.unique(labels[labels >= 0])
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}


def _take_count(n_class: int, fraction: float) -> int:
    """Round to the nearest count but keep at least one sample of every class."""
    return min(n_class, max(1, int(round(fraction * n_class))))


def stratified_test_split(labels: np.ndarray, test_fraction: float, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) index arrays over samples with a known label (>= 0), class proportions kept.

    Every class needs at least two samples so that both sides get one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for c, idx in _per_class_permutations(labels, rng).items():
        if len(idx) < 2:
            raise UserError(f"class {c} has only {len(idx)} labelled sample(s); a stratified "
                            "test split needs at least 2 per class (add data or drop the class)")
        n_test = min(len(idx) - 1, _take_count(len(idx), test_fraction))
        test.append(idx[:n_test])
        pool.append(idx[n_test:])
    if not pool:
        raise UserError("no labelled samples (all labels are -1)")
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))


def nested_label_fractions(labels: np.ndarray, pool: np.ndarray, fractions: list[float],
                           seed: int = 0) -> dict[float, np.ndarray]:
    """Per fraction a stratified subset of `pool` (sorted indices); smaller sets nest in larger."""
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise UserError(f"--label-fractions values must be in (0, 1], got {f}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed + 1)
    pool_labels = np.full(labels.shape, -1, dtype=np.int64)
    pool_labels[pool] = labels[pool]
    perms = _per_class_permutations(pool_labels, rng)
    out: dict[float, np.ndarray] = {}
    for f in fractions:
        chosen = [idx[:_take_count(len(idx), f)] for idx in perms.values()]
        out[f] = np.sort(np.concatenate(chosen))
    return out


def stratified_subsample(labels: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """At most `max_samples` labelled indices with the class proportions kept (for quick runs)."""
    labels = np.asarray(labels)
    known = np.flatnonzero(labels >= 0)
    if max_samples >= len(known):
        return known
    fraction = max_samples / len(known)
    rng = np.random.default_rng(seed + 2)
    chosen = [idx[:_take_count(len(idx), fraction)]
              for idx in _per_class_permutations(labels, rng).values()]
    return np.sort(np.concatenate(chosen))
