"""Metrics against brute-force definitions."""

import itertools

import numpy as np
import pytest

from engine.downstream.metrics import accuracy, average_precision_at_k, map_at_k, roc_auc, roc_auc_ovr


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


# -- against scikit-learn (a test-only dependency) and hand-computed ranking cases --------------------------
def _random_ranking_case(seed, n=40, v=30, k=10):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n, v))  # continuous: no ties, so every definition ranks the same way
    rel = rng.random((n, v)) < rng.uniform(0.02, 0.3, size=(n, 1))
    rel[0] = False  # a user with nothing relevant is skipped by every metric
    offsets = np.concatenate([[0], np.cumsum(rel.sum(1))])
    ids = np.concatenate([np.flatnonzero(r) for r in rel])
    return scores, rel, offsets, ids


@pytest.mark.parametrize("seed", range(3))
def test_auc_and_accuracy_match_sklearn(seed):
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: ties across classes
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert accuracy(y, s > 0.5) == pytest.approx(accuracy_score(y, s > 0.5))
    y3 = rng.integers(0, 4, 300)
    s3 = rng.normal(size=(300, 4)) + np.eye(4)[y3]
    probs = np.exp(s3) / np.exp(s3).sum(1, keepdims=True)  # sklearn wants rows that sum to 1
    expected = roc_auc_score(y3, probs, multi_class="ovr", average="macro")
    assert roc_auc_ovr(y3, probs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_ndcg_matches_sklearn_and_map_matches_reference(seed, k):
    from sklearn.metrics import ndcg_score

    from engine.downstream.metrics import ndcg_at_k, ranking_metrics_per_user, recall_at_k, top_k

    scores, rel, offsets, ids = _random_ranking_case(seed)
    has = rel.any(1)
    assert ndcg_at_k(scores, offsets, ids, k) == pytest.approx(ndcg_score(rel[has], scores[has], k=k), abs=1e-10)
    top = top_k(scores, k)
    ref_ap = [average_precision_at_k(top[i], set(np.flatnonzero(rel[i])), k) for i in np.flatnonzero(has)]
    assert map_at_k(scores, offsets, ids, k) == pytest.approx(np.mean(ref_ap), abs=1e-12)
    ref_recall = [len(set(top[i].tolist()) & set(np.flatnonzero(rel[i]).tolist())) / rel[i].sum()
                  for i in np.flatnonzero(has)]
    assert recall_at_k(scores, offsets, ids, k) == pytest.approx(np.mean(ref_recall), abs=1e-12)
    per = ranking_metrics_per_user(top, offsets, ids, (k,))
    assert np.isnan(per[f"map@{k}"][0]) and np.isfinite(per[f"map@{k}"][has]).all()


def test_recall_and_ndcg_by_hand():
    from engine.downstream.metrics import ranking_metrics_per_user

    # ranked [4, 2, 9]; relevant {2, 7}: hit at rank 2 only.
    per = ranking_metrics_per_user(np.array([[4, 2, 9]]), np.array([0, 2]), np.array([7, 2]), ks=(3, 1))
    assert per["recall@3"][0] == pytest.approx(0.5)
    assert per["recall@1"][0] == 0.0
    assert per["ndcg@3"][0] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert per["map@3"][0] == pytest.approx((1 / 2) / 2)
    # duplicate relevant ids count once
    per = ranking_metrics_per_user(np.array([[5, 6]]), np.array([0, 3]), np.array([5, 5, 6]), ks=(2,))
    assert per["recall@2"][0] == 1.0 and per["ndcg@2"][0] == pytest.approx(1.0)


def test_top_k_orders_by_score_then_id_and_excludes():
    from engine.downstream.metrics import top_k

    scores = np.array([[1.0, 5.0, 5.0, 3.0, 9.0]])
    assert top_k(scores, 3).tolist() == [[4, 1, 2]]
    assert top_k(scores, 3, exclude=np.array([4])).tolist() == [[1, 2, 3]]
    assert top_k(scores, 10).shape == (1, 5)


def test_bootstrap_interval_has_the_normal_width_and_covers_the_estimate():
    from engine.downstream.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    correct = (rng.random(400) < 0.7).astype(float)
    est, lo, hi = bootstrap_ci(lambda i: correct[i].mean(), len(correct), n_boot=2000, seed=1)
    assert lo < est < hi
    se = np.sqrt(est * (1 - est) / len(correct))
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)  # the percentile interval of a mean ~ normal
    # AUC resamples that hold one class only are skipped, not NaN
    y = np.array([1] + [0] * 9)
    est, lo, hi = bootstrap_ci(lambda i: roc_auc(y[i], np.arange(10)[i]), 10, n_boot=200)
    assert np.isfinite(lo) and np.isfinite(hi)


# -- bootstrap resamples as weights (one sort for all resamples) ------------------------------------------
def test_weighted_auc_is_the_auc_of_each_resample_with_ties():
    from engine.downstream.metrics import bootstrap_indices, resample_weights, weighted_auc, weighted_auc_ovr

    rng = np.random.default_rng(4)
    n = 83
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 5, n).astype(float)  # many ties
    idx = bootstrap_indices(n, 40, 2)
    w = resample_weights(idx, n)
    assert w.sum(1).tolist() == [n] * 40
    slow = np.array([roc_auc(y[i], s[i]) for i in idx])
    assert np.allclose(weighted_auc(y, s, w), slow, atol=1e-12)
    assert np.isnan(weighted_auc(np.ones(n), s, w)).all()  # no negative user: undefined, as roc_auc
    yc = rng.integers(0, 4, n)
    sc = rng.normal(size=(n, 4)).round(1)
    slow = np.array([roc_auc_ovr(yc[i], sc[i]) for i in idx])
    assert np.allclose(weighted_auc_ovr(yc, sc, w), slow, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_macro_f1_matches_sklearn_on_all_users_and_on_resamples(seed):
    from sklearn.metrics import f1_score

    from engine.downstream.metrics import bootstrap_indices, macro_f1, resample_weights

    rng = np.random.default_rng(seed)
    n = 120
    y = rng.integers(0, 7, n)
    p = np.where(rng.random(n) < 0.4, y, rng.integers(0, 6, n))  # class 6 is never predicted
    assert macro_f1(y, p, 7) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)
    idx = bootstrap_indices(n, 25, seed)
    slow = np.array([f1_score(y[i], p[i], average="macro") for i in idx])
    assert np.allclose(macro_f1(y, p, 7, resample_weights(idx, n)), slow, atol=1e-12)


def test_grouped_bootstrap_intervals_equal_the_per_resample_computation():
    """evaluate_outputs' fast path (weights) gives exactly the intervals of scoring every resample."""
    from engine.downstream.evaluate import evaluate_outputs
    from engine.downstream.metrics import bootstrap_indices
    from engine.downstream.tasks import TaskData

    rng = np.random.default_rng(1)
    n, c = 150, 5
    y = rng.integers(0, c, n)
    groups = np.repeat(np.arange(3), 50)
    scores = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    td = TaskData("multiclass", np.arange(n), y=y, n_outputs=c)
    r = evaluate_outputs(td, {"m": scores}, groups=groups, n_boot=60, seed=3)
    idx = np.concatenate([np.flatnonzero(groups == g)[bootstrap_indices(50, 60, 3 + 1 + g)] for g in range(3)],
                         axis=1)
    boots = [np.mean([roc_auc_ovr(y[i[groups[i] == g]], scores[i[groups[i] == g]]) for g in range(3)]) for i in idx]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    iv = r.metrics["m"]["auc"]
    assert (iv.low, iv.high) == pytest.approx((lo, hi), abs=1e-12)
    assert iv.value == pytest.approx(np.mean([roc_auc_ovr(y[groups == g], scores[groups == g]) for g in range(3)]))
    assert set(r.metrics["m"]) == {"auc", "accuracy", "macro_f1"}
    assert r.metrics["m"]["macro_f1"].low < r.metrics["m"]["macro_f1"].value < r.metrics["m"]["macro_f1"].high
