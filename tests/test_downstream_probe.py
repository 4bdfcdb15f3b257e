"""The embedding-quality benchmark's parts: the widening L2 search, the linear fit on any features, reading
exported embeddings, the kNN score, and probes that find (or do not find) a planted signal."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.downstream.baselines import fit_linear, fit_logreg, search_on_edges
from engine.downstream.metrics import task_metrics
from engine.downstream.probe import Features, knn_scores, probe_outputs, read_embeddings
from engine.downstream.tasks import FIRST_ID, TaskData, load_task, split_indices
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """360 synthetic users; label: mostly even genre ids (a linear function of the genre counts); and the
    planted feature itself, the share of even genres per user."""
    root = tmp_path_factory.mktemp("probe")
    generate(root / "raw", 360, seed=3, n_genres=30, n_shops=60, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", progress=False)
    data = open_tokenized(root / "tok")
    long = data.segment("long")
    k = long.attributes.index("genre")
    share = np.array([(long.attr_ids[long.user_action_offsets[u]:long.user_action_offsets[u + 1], k] % 2 == 0).mean()
                      if long.user_action_offsets[u + 1] > long.user_action_offsets[u] else 0.0
                      for u in range(data.num_users)])
    pq.write_table(pa.table({"user_id": data.user_ids, "label": (share > np.median(share)).astype(np.int8)}),
                   root / "even.parquet")
    return root, data, share


# -- the L2 search ----------------------------------------------------------------------------------------
def test_search_widens_past_an_edge_until_the_best_is_inside():
    calls = []

    def score(l2):
        calls.append(l2)
        return -(np.log10(l2) - 2.0) ** 2  # best at 100, far above the grid

    best, tried = search_on_edges(score, (1e-4, 1e-3, 1e-2, 1e-1), max_widen=6)
    assert best == pytest.approx(100.0)
    assert [v for v, _ in tried] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0])
    assert len(calls) == 8  # stopped once 1000 was worse than 100
    best, tried = search_on_edges(lambda v: -(np.log10(v) + 7) ** 2, (1e-4, 1e-3, 1e-2), max_widen=2)
    assert best == pytest.approx(1e-6) and len(tried) == 5  # the downward edge, capped at max_widen


def test_search_does_not_widen_an_interior_best_or_a_flat_edge():
    best, tried = search_on_edges(lambda v: -(np.log10(v) + 2) ** 2, (1e-4, 1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1e-2) and len(tried) == 4
    best, tried = search_on_edges(lambda v: 0.7, (1e-4, 1e-3, 1e-2, 1e-1))
    assert best == pytest.approx(1e-4) and len(tried) == 4  # ties: the first value, nothing widened


def test_fit_linear_gives_the_same_model_on_dense_and_sparse_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7)).astype(np.float32)
    y = (x[:, 0] - 0.5 * x[:, 3] + rng.normal(scale=0.5, size=200) > 0).astype(np.int64)
    td = TaskData("binary", np.arange(200), y=y)
    dense = fit_linear(torch.from_numpy(x), td, l2_grid=(1e-2,))
    sparse = fit_linear(torch.from_numpy(x).to_sparse(), td, l2_grid=(1e-2,))
    assert torch.allclose(dense.weight, sparse.weight, atol=1e-4)
    assert dense.weight[0, 0] > 0.5 and dense.weight[3, 0] < -0.2  # it found the planted signs


def test_logreg_records_every_l2_it_tried(tiny):
    root, data, _ = tiny
    td = load_task(root / "even.parquet", data, "binary")
    split = split_indices(len(td), 0.3, 0)
    model = fit_logreg(data, td.subset(split.train), td.subset(split.val))
    values = [v for v, _ in model.linear.tried]
    assert {1e-4, 1e-3, 1e-2, 1e-1} <= set(values) and values == sorted(values)
    best_score = max(s for _, s in model.linear.tried)
    assert dict(model.linear.tried)[model.l2] == best_score
    if model.l2 == values[-1]:  # on the edge after the search: it must have widened as far as allowed
        assert len(values) == 4 + 4


# -- embeddings and the probes ----------------------------------------------------------------------------
def test_read_embeddings_aligns_by_user_id_and_names_a_missing_user(tiny, tmp_path):
    root, data, _ = tiny
    emb = np.random.default_rng(1).normal(size=(data.num_users, 5)).astype(np.float32)
    order = np.random.default_rng(2).permutation(data.num_users)  # the file's rows in another order
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb[order].reshape(-1)), 5)
    pq.write_table(pa.table({"user_id": data.user_ids.take(pa.array(order)), "embedding": values}), tmp_path / "e.pq")
    np.testing.assert_array_equal(read_embeddings(tmp_path / "e.pq", data), emb)
    keep = order[1:]
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb[keep].reshape(-1)), 5)
    pq.write_table(pa.table({"user_id": data.user_ids.take(pa.array(keep)), "embedding": values}), tmp_path / "m.pq")
    with pytest.raises(ValueError, match=rf"1 of {data.num_users} tokenized users have no embedding.*user_id"):
        read_embeddings(tmp_path / "m.pq", data)


def test_knn_scores_equal_a_brute_force_vote():
    rng = np.random.default_rng(0)
    n_train, n, v, k = 40, 7, 12, 5
    train_x = torch.nn.functional.normalize(torch.randn(n_train, 6), dim=1)
    x = torch.nn.functional.normalize(torch.randn(n, 6), dim=1)
    lens = rng.integers(1, 4, n_train)
    ids = np.concatenate([rng.choice(np.arange(FIRST_ID, v), m, replace=False) for m in lens]).astype(np.int32)
    train = TaskData("next", np.arange(n_train), label_offsets=np.concatenate([[0], np.cumsum(lens)]), label_ids=ids,
                     n_outputs=v)
    got = knn_scores(train_x, train, x, k, block=3)
    sim = (x @ train_x.T).numpy()
    want = np.zeros((n, v))
    for i in range(n):
        for j in np.argsort(-sim[i])[:k]:
            items = ids[train.label_offsets[j]:train.label_offsets[j + 1]]
            want[i, items] += max(sim[i, j], 0.0) / len(items)
    np.testing.assert_allclose(got[:, FIRST_ID:], want[:, FIRST_ID:], atol=1e-5)
    assert np.isneginf(got[:, :FIRST_ID]).all()


def test_probes_find_a_planted_signal_and_not_noise(tiny):
    root, data, share = tiny
    td = load_task(root / "even.parquet", data, "binary")
    split = split_indices(len(td), 0.15, 0, test_fraction=0.3)
    test = td.subset(split.test)
    planted = np.stack([share, np.random.default_rng(5).normal(size=len(share))], 1).astype(np.float32)
    noise = np.random.default_rng(6).normal(size=(data.num_users, 8)).astype(np.float32)
    out = probe_outputs(data, td, split, planted)
    auc = {k: task_metrics(test, v)["auc"] for k, v in out.items()}
    assert auc["embedding"] > 0.95  # the label is a threshold of the planted feature
    assert auc["counts"] > 0.8  # ... and a linear function of the genre counts
    assert auc["counts+embedding"] > 0.9
    noisy = probe_outputs(data, td, split, noise, feature_sets=("embedding",))
    assert abs(task_metrics(test, noisy["embedding"])["auc"] - 0.5) < 0.15


def test_features_of_both_kinds_side_by_side(tiny):
    root, data, share = tiny
    emb = np.random.default_rng(0).normal(size=(data.num_users, 3)).astype(np.float32) * 10 + 4
    rows = np.arange(100)
    both = Features("counts+embedding", data, emb, rows)
    counts = Features("counts", data, None, rows)
    x, c = both.tensor(rows).to_dense(), counts.tensor(rows).to_dense()
    assert x.shape[1] == c.shape[1] + 3
    torch.testing.assert_close(x[:, :c.shape[1]], c)
    e = x[:, c.shape[1]:]  # standardised on these (the training) rows
    torch.testing.assert_close(e.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(e.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    u = both.unit_rows(rows)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(100), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs embeddings"):
        Features("embedding", data, None, rows)
