"""Cheap health signals while pre-training: embedding spread (collapse), online k-NN accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from hpcsrl.features.knn import knn_predict

# Warn when the spread falls below this fraction of the healthy 1/sqrt(d).
COLLAPSE_FRACTION = 0.1


def embedding_std(z: Tensor) -> float:
    """Mean over dimensions of the per-dimension std of L2-normalised embeddings.

    About 1/sqrt(d) when embeddings spread over the sphere; about 0 when all inputs map to one
    point (SimSiam's collapse diagnostic).
    """
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


def collapse_threshold(dim: int) -> float:
    return COLLAPSE_FRACTION / math.sqrt(dim)


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray,
                 query_labels: np.ndarray, k: int = 20) -> float:
    """Accuracy of a k-NN classifier fit on `bank` features, evaluated on held-out `query`."""
    if len(bank) == 0 or len(query) == 0:
        return float("nan")
    pred = knn_predict(bank, bank_labels, query, k=k)
    return float((pred == query_labels).mean())
