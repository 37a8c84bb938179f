"""The channel-statistics k-NN floor: what per-band colour/brightness alone can tell apart.

A learned encoder that does not beat this has learned nothing beyond band statistics.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                k: int = 5) -> np.ndarray:
    """k-NN (distance-weighted, Euclidean on train-standardised features) predictions.

    `train_labels` may be (N,) classes or (N, K) multi-hot rows (sklearn handles multi-output).
    """
    mean = train_feats.mean(axis=0)
    std = train_feats.std(axis=0)
    std[std < 1e-12] = 1.0
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_feats)), weights="distance")
    clf.fit((train_feats - mean) / std, train_labels)
    return clf.predict((test_feats - mean) / std)
