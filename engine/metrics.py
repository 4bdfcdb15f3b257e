"""Downstream metrics: ROC AUC, accuracy, mAP@k (numpy; no torch, no sklearn).

ROC AUC is the Mann-Whitney statistic with average ranks for ties, so a constant score gives
exactly 0.5.  mAP@k follows the usual recommender definition::

    AP@k(u) = sum_{i<=k} P@i * rel_i / min(|Y_u|, k)

averaged over users with at least one relevant item.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Boundaries of runs of equal values.
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC.  NaN when only one class is present."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Multi-class ROC AUC: the unweighted mean of one-vs-rest AUCs over classes present."""
    labels = np.asarray(labels).ravel()
    aucs = [roc_auc(labels == c, scores[:, c]) for c in range(scores.shape[1]) if (labels == c).any()]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    predictions = np.asarray(predictions).ravel()
    return float((labels == predictions).mean()) if len(labels) else float("nan")


def average_precision_at_k(ranked: np.ndarray, relevant: set[int] | np.ndarray, k: int = 10) -> float:
    """AP@k of one ranked list of item ids against a set of relevant ids."""
    relevant = set(np.asarray(list(relevant)).tolist())
    if not relevant:
        return float("nan")
    hits = 0
    total = 0.0
    for i, item in enumerate(np.asarray(ranked)[:k].tolist()):
        if item in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / min(len(relevant), k)


def map_at_k(scores: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray, k: int = 10,
             exclude: np.ndarray | None = None) -> float:
    """mAP@k from a score matrix [N, V] and CSR relevant sets.

    ``exclude``: item ids never ranked (the reserved padding/unknown ids).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    if exclude is not None and len(exclude):
        scores[:, exclude] = -np.inf
    k_eff = min(k, scores.shape[1])
    top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    # argpartition leaves the top k unordered: sort them by score (ties by id, for determinism).
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    aps = [
        average_precision_at_k(top[i], label_ids[label_offsets[i]:label_offsets[i + 1]], k)
        for i in range(scores.shape[0])
    ]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")
