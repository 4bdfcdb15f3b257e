"""Metrics against brute-force definitions."""

import itertools

import numpy as np
import pytest

from engine.metrics import accuracy, average_precision_at_k, map_at_k, roc_auc, roc_auc_ovr
from engine.schedule import lr_factor


def brute_auc(y, s):
    pos = [si for yi, si in zip(y, s) if yi]
    neg = [si for yi, si in zip(y, s) if not yi]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 57)
    s = rng.integers(0, 6, 57).astype(float)  # many ties
    assert roc_auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_edge_cases():
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert roc_auc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert np.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_ovr_auc_and_accuracy():
    y = np.array([0, 1, 2, 2])
    scores = np.eye(3)[y] + 0.01
    assert roc_auc_ovr(y, scores) == 1.0
    assert accuracy(y, scores.argmax(1)) == 1.0
    assert accuracy(y, np.zeros(4)) == 0.25


def test_average_precision_at_k_by_hand():
    # relevant {3, 7}; ranking 3, 5, 7: P@1 = 1, P@3 = 2/3 -> (1 + 2/3) / 2
    assert average_precision_at_k(np.array([3, 5, 7]), {3, 7}, k=10) == pytest.approx((1 + 2 / 3) / 2)
    # more relevant items than k: divide by k
    assert average_precision_at_k(np.array([1, 2]), {1, 2, 3, 4}, k=2) == pytest.approx(1.0)
    assert average_precision_at_k(np.array([9, 8]), {1}, k=2) == 0.0


def test_map_at_k_ranks_by_score_and_excludes_reserved_ids():
    scores = np.array([[9.0, 8.0, 1.0, 3.0, 2.0], [0.0, 0.0, 5.0, 4.0, 6.0]])
    offsets = np.array([0, 1, 3])
    ids = np.array([3, 4, 2])
    # row 0: ids 0, 1 excluded -> ranking 3, 4, 2: relevant 3 at rank 1 -> AP 1
    # row 1: ranking 4, 2, 3: relevant {4, 2} at ranks 1, 2 -> AP 1
    assert map_at_k(scores, offsets, ids, k=10, exclude=np.array([0, 1])) == pytest.approx(1.0)
    # without exclusion row 0 ranks 0, 1 first: relevant 3 at rank 3 -> 1/3
    assert map_at_k(scores[:1], offsets[:2], ids[:1], k=10) == pytest.approx(1 / 3)


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == 1.0
    assert lr_factor(10, 100, 10, "linear") == 1.0
    assert lr_factor(100, 100, 10, "linear") == 0.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
