"""The paper's multi-task baselines (engine/downstream/mtl_baselines.py): shapes, the masked multi-task loss,
gradients, the wide input, and train_mtl end to end on tiny synthetic data."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.config import ModelConfig, VocabSpec
from engine.data.collate import CollateConfig, Collator
from engine.downstream.finetune import Target
from engine.downstream.mtl_baselines import (
    ARCHS,
    LabelIndex,
    MTLConfig,
    MTLModel,
    TaskSpec,
    TaskTargets,
    WideDeep,
    build_trunk,
    train_mtl,
    union_rows,
)
from engine.downstream.tasks import load_task, split_indices
from engine.model.userbert import user_attr_offsets
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate

CFG = ModelConfig(hidden=16, layers=1, heads=2, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtl")
    generate(root / "raw", 200, seed=5, n_genres=20, n_shops=50, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", progress=False)
    data = open_tokenized(root / "tok")
    lab = root / "raw" / "labels"
    tasks = {"is_parent": load_task(lab / "is_parent.parquet", data, "binary"),
             "targeting": load_task(lab / "targeting.parquet", data, "binary"),
             "next_genre": load_task(lab / "next_genre.parquet", data, "next", "long.genre")}
    # A multiclass task too: the user's first user attribute (3+ classes), on every other user.
    if data.user_attr_ids.shape[1]:
        rows = np.arange(0, data.num_users, 2)
        pq.write_table(pa.table({"user_id": data.user_ids.take(pa.array(rows)),
                                 "label": data.user_attr_ids[rows, 0].astype(np.int64)}), root / "mc.parquet")
        tasks["attr"] = load_task(root / "mc.parquet", data, "multiclass")
    return data, tasks


def _heads(tasks):
    return {n: TaskSpec(td.task, td.n_outputs) for n, td in tasks.items()}


def _collator(data):
    return Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest)), CollateConfig(select_prob=0.0))


def _no_word_users(data):
    n = sum(np.diff(seg.user_word_offsets) for seg in data.segments)
    return np.flatnonzero(n == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_odd_batches_and_users_without_words(tiny, arch):
    data, tasks = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    torch.manual_seed(0)
    model = MTLModel(build_trunk(arch, CFG, spec), _heads(tasks), CFG.hidden).eval()
    col = _collator(data)
    empty = _no_word_users(data)
    for rows in (np.array([3]), np.arange(7), np.arange(10, 23)):
        h = model(col(rows))
        assert h.shape == (len(rows), CFG.hidden) and torch.isfinite(h).all()
        for name, td in tasks.items():
            assert model.heads[name](h).shape == (len(rows), td.n_outputs)
    # Users with no behaviour word: mixed with others (odd batch), and alone (every segment of the batch empty).
    assert len(empty) >= 1  # the synthetic data has some
    for rows in (np.concatenate([empty[:2], [0, 1, 2]]), empty[:1]):
        b = col(rows)
        h = model(b)
        assert h.shape == (len(rows), CFG.hidden) and torch.isfinite(h).all()
    assert b.segments[0].n_words == 0


def test_multitask_loss_masks_users_without_a_label():
    torch.manual_seed(0)
    model = MTLModel(torch.nn.Identity(), {"a": TaskSpec("binary", 1), "b": TaskSpec("multiclass", 3)}, 4)
    h = torch.randn(5, 4, requires_grad=True)
    ya, yb = torch.tensor([1, 0]), torch.tensor([2, 0, 1])
    targets = {"a": TaskTargets(torch.tensor([1, 3]), Target(y=ya)),
               "b": TaskTargets(torch.tensor([0, 3, 4]), Target(y=yb))}
    loss, stats = model.loss(h, targets)
    la = torch.nn.functional.binary_cross_entropy_with_logits(model.heads["a"](h[[1, 3]])[:, 0], ya.float())
    lb = torch.nn.functional.cross_entropy(model.heads["b"](h[[0, 3, 4]]), yb)
    assert torch.allclose(loss, la + lb) and stats["loss/a"] == pytest.approx(float(la.detach()))
    loss.backward()
    # user 2 has no label of any task: no gradient reaches its state; user 1 only through task a
    assert h.grad[2].abs().sum() == 0 and h.grad[1].abs().sum() > 0
    # a task with no labelled user in the batch adds nothing
    none = {"a": TaskTargets(torch.zeros(0, dtype=torch.long), Target(y=torch.zeros(0, dtype=torch.long))),
            "b": targets["b"]}
    assert torch.allclose(model.loss(h, none)[0], lb)


def test_label_index_targets_follow_the_rows(tiny):
    data, tasks = tiny
    index = LabelIndex(tasks, data.num_users)
    rows = np.arange(30)
    t = index.targets(rows, torch.device("cpu"))
    td = tasks["is_parent"]
    have = set(td.rows.tolist())
    assert t["is_parent"].have.tolist() == [i for i, r in enumerate(rows) if r in have]
    want = [int(td.y[np.flatnonzero(td.rows == r)[0]]) for r in rows if r in have]
    assert t["is_parent"].target.y.tolist() == want


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reaches_every_trunk_parameter(tiny, arch):
    data, tasks = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    torch.manual_seed(1)
    model = MTLModel(build_trunk(arch, CFG, spec), _heads(tasks), CFG.hidden)
    rows = np.arange(40)
    loss, _ = model.loss(model(_collator(data)(rows)), LabelIndex(tasks, data.num_users).targets(rows, "cpu"))
    loss.backward()
    missing = [n for n, p in model.trunk.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_wide_input_is_the_bag_of_counts(tiny):
    data, _ = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    wd = WideDeep(CFG, spec)
    u = int(np.argmax(np.diff(data.segments[0].user_action_offsets)))  # a user with many actions
    rows = np.array([0, u, 1])
    r, c, n = wd.wide_input(_collator(data)(rows))
    dense = torch.zeros(3, wd.n_wide).index_put_((r, c), n)
    # by hand, from the tokenized arrays: count of each attribute value over the user's actions, per segment
    want = np.zeros(wd.n_wide)
    col = 0
    for seg, sv in zip(data.segments, spec.segments):
        acts = seg.attr_ids[seg.user_action_offsets[u]:seg.user_action_offsets[u + 1]]
        for k, v in enumerate(sv.vocab_sizes):
            for x in acts[:, k]:
                if x > 0:
                    want[col + x] += 1
            col += v
    for j, v in enumerate(spec.user_vocab_sizes):
        want[col + data.user_attr_ids[u, j]] = 1
        col += v
    assert col == wd.n_wide and want.sum() > 10
    np.testing.assert_array_equal(dense[1].numpy(), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_mtl_lowers_the_loss_and_predicts_in_the_evaluation_format(tiny, arch):
    data, tasks = tiny
    users = union_rows(tasks)
    s = split_indices(len(users), 0.15, seed=0, test_fraction=0.15)
    train, val, test = users[s.train], users[s.val], users[s.test]
    predict_rows = {n: td.rows[np.isin(td.rows, test)] for n, td in tasks.items()}
    res = train_mtl(data, tasks, arch, CFG, train, val, predict_rows,
                    cfg=MTLConfig(batch_size=32, epochs=3, lr=3e-3, patience=5))
    h = res.history
    assert len(h) == 3 and h[-1]["train_loss"] < h[0]["train_loss"]
    assert 0 <= res.best_epoch < 3 and np.isfinite(h[res.best_epoch]["val_score"])
    assert set(res.val) == set(tasks) and "map@10" in res.val["next_genre"]
    for name, td in tasks.items():
        out = res.outputs[name]
        n = len(predict_rows[name])
        if td.task == "next":
            assert out.shape == (n, 10) and out.dtype == np.int64 and (out >= 2).all()  # reserved ids never ranked
        else:
            assert out.shape == (n, td.n_outputs) and out.dtype == np.float32
