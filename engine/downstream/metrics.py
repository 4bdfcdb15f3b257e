"""Downstream metrics: ROC AUC, accuracy, macro-F1, mAP@k, recall@k, NDCG@k, and bootstrap intervals.

numpy only (no torch, no scikit-learn; tests check these against scikit-learn and hand-computed cases).

ROC AUC is the Mann-Whitney statistic with average ranks for ties, so a constant score gives
exactly 0.5.  The ranking metrics follow the usual recommender definitions, for a user u with
relevant set Y_u and ranked list r_1, r_2, ... (rel_i = 1 when r_i is in Y_u)::

    AP@k(u)     = sum_{i<=k} P@i * rel_i / min(|Y_u|, k)
    recall@k(u) = |{r_1..r_k} & Y_u| / |Y_u|
    NDCG@k(u)   = sum_{i<=k} rel_i / log2(i + 1)  /  sum_{i<=min(|Y_u|, k)} 1 / log2(i + 1)

each averaged over users with at least one relevant item.  Rankings are computed from score
matrices in row blocks (:func:`top_k`), so a large vocabulary never needs an [N, V] matrix at once
when the caller streams blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tokenizer.schema import FIRST_ID

if TYPE_CHECKING:
    from engine.downstream.tasks import TaskData


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


def resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """float64 [B, n]: how often each of n users occurs in each row of a bootstrap index matrix [B, m]."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of user weights [B, n] (a bootstrap resample as multiplicities): [B].

    The Mann-Whitney statistic with ties counted half, as :func:`roc_auc`: one sort for all resamples,
    so 1,000 resamples cost about as much as 1,000 sums rather than 1,000 sorts.  NaN where a resample
    has no positive or no negative user.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")
    ss, yy, w = s[order], y[order], weights[:, order]
    starts = np.flatnonzero(np.concatenate([[True], ss[1:] != ss[:-1]]))  # runs of tied scores
    pos = np.add.reduceat(w * yy, starts, axis=1) if len(ss) else np.zeros((len(w), 0))  # [B, groups]
    neg = np.add.reduceat(w * ~yy, starts, axis=1) if len(ss) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each run
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def weighted_auc_ovr(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """:func:`roc_auc_ovr` under each row of weights [B, n]: the mean one-vs-rest AUC over classes present."""
    labels = np.asarray(labels).ravel()
    per = np.stack([weighted_auc(labels == c, scores[:, c], weights) for c in range(scores.shape[1])])  # [C, B]
    return _nanmean_rows(per)


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (no warning) where a column is all NaN."""
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, x, 0.0).sum(0) / ok.sum(0)


def macro_f1(labels: np.ndarray, predictions: np.ndarray, n_classes: int,
             weights: np.ndarray | None = None) -> np.ndarray | float:
    """Macro-averaged F1 over the classes that occur among the labels or the predictions (scikit-learn's
    ``f1_score(average="macro")``); per row of ``weights`` [B, n] when given (bootstrap multiplicities)."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(predictions, dtype=np.int64).ravel()
    w = np.ones((1, len(y))) if weights is None else weights
    hit = (y == p).astype(np.float64)
    tp = np.stack([w @ (hit * (y == c)) for c in range(n_classes)], 1)  # [B, C]
    true = np.stack([w @ (y == c).astype(np.float64) for c in range(n_classes)], 1)
    pred = np.stack([w @ (p == c).astype(np.float64) for c in range(n_classes)], 1)
    present = (true + pred) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * tp / (true + pred), 0.0)
        out = f1.sum(1) / present.sum(1)
    return float(out[0]) if weights is None else out


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    predictions = np.asarray(predictions).ravel()
    return float((labels == predictions).mean()) if len(labels) else float("nan")


def average_precision_at_k(ranked: np.ndarray, relevant: set[int] | np.ndarray, k: int = 10) -> float:
    """AP@k of one ranked list of item ids against a set of relevant ids (the reference definition)."""
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


def mask_items(scores, seen: tuple[np.ndarray, np.ndarray] | None, start: int = 0):
    """Set ``scores[i, item] = -inf`` for the seen items of users ``start + i`` (numpy or torch, in place)."""
    if seen is None:
        return scores
    offsets, ids = seen
    n = scores.shape[0]
    lo, hi = int(offsets[start]), int(offsets[start + n])
    if hi > lo:
        who = np.repeat(np.arange(n), np.diff(offsets[start:start + n + 1]))
        item = ids[lo:hi]
        if isinstance(scores, np.ndarray):
            scores[who, item] = -np.inf
        else:
            import torch

            scores[torch.from_numpy(who).to(scores.device), torch.from_numpy(item).to(scores.device)] = float("-inf")
    return scores


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None,
          seen: tuple[np.ndarray, np.ndarray] | None = None, start: int = 0) -> np.ndarray:
    """int64 [N, min(k, V)]: the k best item ids of each row, best first (ties: the smaller id first).

    ``exclude``: item ids never ranked (the reserved padding/unknown ids).  ``seen``: per-user item ids never
    ranked either (TaskData.seen_csr(), whose user ``start + i`` is row i; :func:`mask_items`).  A user with
    fewer than k other items gets the rest of the list filled from the excluded ones.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    if scores.ndim != 2:
        raise ValueError(f"scores: expected a [N, V] matrix, got shape {scores.shape}")
    if exclude is not None and len(exclude):
        scores[:, np.asarray(exclude)] = -np.inf
    mask_items(scores, seen, start)
    k_eff = min(k, scores.shape[1])
    if k_eff == 0 or scores.shape[0] == 0:
        return np.zeros((scores.shape[0], k_eff), np.int64)
    top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    # argpartition leaves the top k unordered (and picks arbitrarily among ties at the boundary):
    # sort them by score, ties by id, for determinism.
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def _hits(top: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [N, k] (is the item at rank i relevant) and int64 [N] relevant-set sizes (distinct ids)."""
    n, k = top.shape
    label_offsets = np.asarray(label_offsets, dtype=np.int64)
    label_ids = np.asarray(label_ids, dtype=np.int64)
    if len(label_offsets) != n + 1:
        raise ValueError(f"label_offsets: expected {n + 1} entries for {n} rows, got {len(label_offsets)}")
    # Relevant sets as sorted (row, id) keys; a ranked item is a hit when its key is among them.
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(label_offsets))
    width = int(max(top.max(initial=0), label_ids.max(initial=0))) + 1
    keys = np.unique(rows * width + label_ids)
    n_rel = np.bincount(keys // width, minlength=n).astype(np.int64)
    if n == 0 or k == 0:
        return np.zeros((n, k), bool), n_rel
    probe = np.arange(n, dtype=np.int64)[:, None] * width + top
    pos = np.minimum(np.searchsorted(keys, probe), max(len(keys) - 1, 0))
    hits = keys[pos] == probe if len(keys) else np.zeros_like(probe, dtype=bool)
    return hits, n_rel


def ranking_metrics_per_user(top: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray,
                             ks: Sequence[int] = (10,)) -> dict[str, np.ndarray]:
    """Per-user ``map@k``, ``recall@k`` and ``ndcg@k`` for each k in ``ks`` (NaN for users with no
    relevant item), from ranked lists ``top`` [N, >= max(ks)] (see :func:`top_k`)."""
    hits, n_rel = _hits(np.asarray(top, dtype=np.int64), label_offsets, label_ids)
    out: dict[str, np.ndarray] = {}
    valid = n_rel > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            h = hits[:, :k].astype(np.float64)
            ranks = np.arange(1, h.shape[1] + 1, dtype=np.float64)
            cum = np.cumsum(h, axis=1)
            ap = (cum / ranks * h).sum(1) / np.minimum(n_rel, k)
            recall = h.sum(1) / n_rel
            disc = 1.0 / np.log2(ranks + 1.0)
            dcg = (h * disc).sum(1)
            ideal_disc = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))])
            idcg = ideal_disc[np.minimum(n_rel, k)]
            out[f"map@{k}"] = np.where(valid, ap, np.nan)
            out[f"recall@{k}"] = np.where(valid, recall, np.nan)
            out[f"ndcg@{k}"] = np.where(valid, dcg / idcg, np.nan)
    return out


def map_at_k(scores: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray, k: int = 10,
             exclude: np.ndarray | None = None) -> float:
    """mAP@k from a score matrix [N, V] and CSR relevant sets.

    ``exclude``: item ids never ranked (the reserved padding/unknown ids).
    """
    per_user = ranking_metrics_per_user(top_k(scores, k, exclude), label_offsets, label_ids, (k,))[f"map@{k}"]
    return _nanmean(per_user)


def recall_at_k(scores: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray, k: int = 10,
                exclude: np.ndarray | None = None) -> float:
    per_user = ranking_metrics_per_user(top_k(scores, k, exclude), label_offsets, label_ids, (k,))[f"recall@{k}"]
    return _nanmean(per_user)


def ndcg_at_k(scores: np.ndarray, label_offsets: np.ndarray, label_ids: np.ndarray, k: int = 10,
              exclude: np.ndarray | None = None) -> float:
    per_user = ranking_metrics_per_user(top_k(scores, k, exclude), label_offsets, label_ids, (k,))[f"ndcg@{k}"]
    return _nanmean(per_user)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


# -- bootstrap --------------------------------------------------------------------------------------------
def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """int64 [n_boot, n]: resamples of n users with replacement (shared across models = a paired bootstrap)."""
    return np.random.default_rng([seed, 8675309]).integers(0, n, size=(n_boot, n))


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, indices: np.ndarray | None = None) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic on all n users and the percentile bootstrap interval.

    ``statistic(idx)`` computes the metric on the users ``idx`` (an int array, repeats allowed).
    Resamples where the statistic is undefined (NaN: an AUC resample with one class) are skipped.
    Pass the same ``indices`` to two statistics to get paired intervals (e.g. of a difference).
    """
    estimate = float(statistic(np.arange(n)))
    if n == 0:
        return estimate, float("nan"), float("nan")
    idx = bootstrap_indices(n, n_boot, seed) if indices is None else indices
    values = np.array([statistic(i) for i in idx], dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return estimate, float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return estimate, float(low), float(high)


# -- per task ---------------------------------------------------------------------------------------------
RANK_K = 10  # ranked list length of next-item tasks (mAP@10, as in the paper)


def task_statistics(td: TaskData, outputs: np.ndarray, ks: tuple[int, ...], groups: np.ndarray | None = None):
    """The one task -> metrics mapping: metric name -> f(idx) computing it on the users idx (batched over a
    [n_boot, n] index matrix for bootstrap intervals; :func:`task_metrics` evaluates it on all users).
    Binary: AUC and accuracy of scores ``[n, 1]`` (logits, > 0 predicts 1); multiclass: one-vs-rest AUC and
    accuracy of ``[n, C]``; next: mAP, recall and NDCG at each k of top-k item ids ``[n, k]``.

    ``groups`` (binary/multiclass): AUC is the mean of the per-group AUCs.  Out-of-fold predictions
    of K models (cross-validation) are not on one scale: pooling them into one AUC mixes their
    offsets (the most-popular prior, which is a constant per fold, pools to an AUC below 0.5).
    """
    if td.task == "next":
        per = ranking_metrics_per_user(outputs, td.label_offsets, td.label_ids, ks)

        def mean_of(values: np.ndarray):
            def f(idx: np.ndarray) -> np.ndarray:
                with np.errstate(invalid="ignore"):
                    return np.nanmean(values[idx], axis=-1)
            return f

        return {m: mean_of(v) for m, v in per.items()}
    y = td.y
    n = len(y)
    if td.task == "binary":
        s = outputs[:, 0]
        pred = (s > 0).astype(np.int64)
        one = lambda i: roc_auc(y[i], s[i])
        weighted = lambda members, w: weighted_auc(y[members], s[members], w)
    else:
        pred = outputs.argmax(1)
        one = lambda i: roc_auc_ovr(y[i], outputs[i])
        weighted = lambda members, w: weighted_auc_ovr(y[members], outputs[members], w)
    parts = [np.arange(n)] if groups is None else [np.flatnonzero(groups == g) for g in np.unique(groups)]

    def auc(idx: np.ndarray):
        if idx.ndim == 1:  # the point estimate, on these users exactly
            if groups is None:
                return one(idx)
            return float(np.nanmean([one(idx[groups[idx] == g]) for g in np.unique(groups)]))
        # Resamples: one sort per fold for all of them (weights = multiplicities), the mean over folds.
        w = resample_weights(idx, n)
        per = np.stack([weighted(m, w[:, m]) for m in parts])  # [folds, B]
        return _nanmean_rows(per)

    correct = (pred == y).astype(np.float64)
    out = {"auc": auc, "accuracy": lambda idx: correct[idx].mean(axis=-1)}
    if td.task == "multiclass":
        def f1(idx: np.ndarray):
            if idx.ndim == 1:
                return macro_f1(y[idx], pred[idx], td.n_outputs)
            return macro_f1(y, pred, td.n_outputs, resample_weights(idx, n))
        out["macro_f1"] = f1
    return out


def task_metrics(td: TaskData, outputs: np.ndarray, ks: tuple[int, ...] = (RANK_K,)) -> dict[str, float]:
    """Metrics of the users of ``td`` from model outputs (scores, or top-k ids for next)."""
    everyone = np.arange(len(outputs))
    return {m: float(f(everyone)) for m, f in task_statistics(td, outputs, ks).items()}


def score_metrics(td: TaskData, scores: np.ndarray) -> dict[str, float]:
    """Metrics from a full score matrix (next: [n, V] scores are ranked here, reserved ids never)."""
    if td.task == "next":
        return task_metrics(td, top_k(scores, RANK_K, np.arange(FIRST_ID), td.seen_csr()))
    return task_metrics(td, scores)
