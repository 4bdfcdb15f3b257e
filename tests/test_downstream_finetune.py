"""Fine-tuning: label-table checks, splits, training modes, the backend hook, outputs; evaluation and baselines."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli.main import main
from engine.config import VocabSpec, load_config
from engine.downstream.baselines import bag_layout, fit_logreg, history_scorer, item_counts, popularity_scores
from engine.downstream.evaluate import baseline_outputs, evaluate_outputs
from engine.downstream.finetune import TaskModel, build_encoder, finetune, load_task_model, param_groups, predict
from engine.downstream.metrics import score_metrics, task_metrics
from engine.downstream.tasks import LabelError, TaskData, load_task, make_split, split_indices
from engine.train.backends import TorchBackend
from engine.train.distributed import DistContext
from tokenizer.io import InputError
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate

TINY = {"model.hidden": 32, "model.layers": 1, "model.heads": 2, "model.dropout": 0.0, "model.attn_dropout": 0.0,
        "train.device": "cpu", "finetune.batch_size": 32, "finetune.lr": 3e-3, "finetune.head_lr_mult": 1.0,
        "finetune.epochs": 6, "finetune.patience": 6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """360 synthetic users, tokenized, plus a label that behaviour determines: does the user buy mostly
    genres with an even vocabulary id (a linear function of the genre counts)."""
    root = tmp_path_factory.mktemp("ft")
    generate(root / "raw", 360, seed=3, n_genres=30, n_shops=60, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", progress=False)
    data = open_tokenized(root / "tok")
    long = data.segment("long")
    k = long.attributes.index("genre")
    share = []
    for u in range(data.num_users):
        g = long.attr_ids[long.user_action_offsets[u]:long.user_action_offsets[u + 1], k]
        share.append((g % 2 == 0).mean() if len(g) else 0.0)
    share = np.array(share)
    label = (share > np.median(share)).astype(np.int8)
    pq.write_table(pa.table({"user_id": data.user_ids, "label": label}), root / "even.parquet")
    return root, data


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


# -- label tables -----------------------------------------------------------------------------------------
def test_bad_label_tables_say_what_is_wrong(tiny, tmp_path, caplog):
    root, data = tiny
    ids = data.user_ids.to_pylist()
    with pytest.raises(LabelError, match=r"column 'label'.*2 of 4 labels are missing.*rows 1 \(user_id"):
        load_task(_write(tmp_path / "a.parquet", user_id=ids[:4], label=pa.array([1, None, 0, None], pa.int8())),
                  data, "binary")
    with pytest.raises(LabelError, match=r"binary task expects 0/1.*string.*'yes'.*multiclass"):
        load_task(_write(tmp_path / "b.parquet", user_id=ids[:3], label=["yes", "no", "yes"]), data, "binary")
    with pytest.raises(LabelError, match=r"expects 0/1 labels, found \[2\] in rows 1 \(user_id"):
        load_task(_write(tmp_path / "c.parquet", user_id=ids[:3], label=[0, 2, 1]), data, "binary")
    with pytest.raises(LabelError, match=r"task 'next' expects a list of long.genre values.*int64"):
        load_task(_write(tmp_path / "d.parquet", user_id=ids[:3], label=[0, 1, 1]), data, "next")
    with pytest.raises(LabelError, match=r"holds lists.*expects one value per user"):
        load_task(_write(tmp_path / "e.parquet", user_id=ids[:2], label=[["a"], ["b"]]), data, "multiclass")
    with pytest.raises(LabelError, match=r"appear more than once, e.g. user_id .* in rows \[0, 2\]"):
        load_task(_write(tmp_path / "f.parquet", user_id=[ids[0], ids[1], ids[0]], label=[0, 1, 1]), data, "binary")
    with pytest.raises(LabelError, match=r"none of the labelled users is known.*user ids look like"):
        load_task(_write(tmp_path / "g.parquet", user_id=[-5, -6], label=[0, 1]), data, "binary")
    with pytest.raises(LabelError, match=r"column 'user_id'.*cannot match"):
        load_task(_write(tmp_path / "h.parquet", user_id=["x", "y"], label=[0, 1]), data, "binary")
    with pytest.raises(InputError, match=r"column 'label' .* not found; the file has columns: user_id, target"):
        load_task(_write(tmp_path / "i.parquet", user_id=ids[:2], target=[0, 1]), data, "binary")
    with pytest.raises(LabelError, match=r"column 'split': expected train, val or test, found 'dev' in rows 1"):
        load_task(_write(tmp_path / "j.parquet", user_id=ids[:2], label=[0, 1], split=["train", "dev"]), data,
                  "binary")
    # some unknown users: a warning that shows them, or an error when strict
    path = _write(tmp_path / "k.parquet", user_id=[*ids[:5], -1, -2], label=[0, 1, 0, 1, 1, 0, 1])
    with caplog.at_level(logging.WARNING, logger="userbert"):
        td = load_task(path, data, "binary")
    assert len(td) == 5 and td.unknown_users == 2 and "rows 5 (user_id -1), 6 (user_id -2)" in caplog.text
    with pytest.raises(LabelError, match="2 of 7 labelled users are not in the tokenized data"):
        load_task(path, data, "binary", strict_users=True)


def test_label_types_that_are_accepted(tiny, tmp_path):
    root, data = tiny
    ids = data.user_ids.to_pylist()[:4]
    td = load_task(_write(tmp_path / "bool.parquet", user_id=ids, label=[True, False, True, True]), data, "binary")
    assert td.y.tolist() == [1, 0, 1, 1]
    td = load_task(_write(tmp_path / "f.parquet", user_id=ids, label=[1.0, 0.0, 0.0, 1.0]), data, "binary")
    assert td.y.tolist() == [1, 0, 0, 1]
    td = load_task(_write(tmp_path / "m.parquet", user_id=ids, label=["b", "a", "c", "a"]), data, "multiclass")
    assert td.classes == ["a", "b", "c"] and td.y.tolist() == [1, 0, 2, 0] and td.n_outputs == 3
    csv = tmp_path / "labels.csv"
    csv.write_text("user_id,label\n" + "\n".join(f"{u},{i % 2}" for i, u in enumerate(ids)) + "\n")
    assert load_task(csv, data, "binary").y.tolist() == [0, 1, 0, 1]


# -- splits -----------------------------------------------------------------------------------------------
def test_seeded_split_is_disjoint_complete_and_reproducible():
    s = split_indices(1000, 0.1, seed=4, test_fraction=0.2)
    assert s.sizes() == {"train": 700, "val": 100, "test": 200}
    assert len(np.unique(np.concatenate([s.train, s.val, s.test]))) == 1000
    again = split_indices(1000, 0.1, seed=4, test_fraction=0.2)
    assert np.array_equal(s.test, again.test) and np.array_equal(s.val, again.val)
    assert not np.array_equal(s.test, split_indices(1000, 0.1, seed=5, test_fraction=0.2).test)
    assert split_indices(10, 0.0, seed=0).sizes() == {"train": 10, "val": 0, "test": 0}


def test_provided_split_column_and_file_are_followed(tiny, tmp_path):
    root, data = tiny
    ids = data.user_ids.to_pylist()[:40]
    names = ["test"] * 8 + ["val"] * 4 + ["train"] * 28
    td = load_task(_write(tmp_path / "s.parquet", user_id=ids, label=[i % 2 for i in range(40)], split=names),
                   data, "binary")
    s = make_split(td, 0.1, 0.2, seed=0)
    assert s.test.tolist() == list(range(8)) and s.val.tolist() == list(range(8, 12))
    # a split file overrides; without val users, val is carved from train
    split_file = _write(tmp_path / "split.parquet", user_id=ids[::-1], split=(["train"] * 30 + ["test"] * 10))
    s = make_split(td, 0.1, 0.2, seed=0, split_path=split_file, data=data)
    assert sorted(s.test.tolist()) == list(range(10)) and len(s.val) > 0
    assert not set(s.val) & set(s.train) and set(s.val) | set(s.train) == set(range(10, 40))
    with pytest.raises(LabelError, match="have no split"):
        make_split(td, 0.1, 0.2, 0, _write(tmp_path / "short.parquet", user_id=ids[:5], split=["train"] * 5), data)


# -- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_finetune_learns_a_behavioural_label_and_writes_its_outputs(tiny, tmp_path, pooling):
    root, data = tiny
    cfg = load_config(None, {**TINY, "finetune.pooling": pooling})
    spec = VocabSpec.from_manifest(data.manifest)
    td = load_task(root / "even.parquet", data, "binary")
    res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False,
                   out_dir=tmp_path / "ft", init_name="scratch")
    assert res.sizes == {"train": 252, "val": 36, "test": 72}
    assert len(res.history) >= 1 and {"train_loss", "val_loss", "val.auc", "test.auc", "test.accuracy"} <= set(
        res.history[0])
    assert res.test["auc"] > 0.7, res.history  # chance is 0.5
    assert res.history[res.best_epoch]["val.auc"] == max(h["val.auc"] for h in res.history)
    doc = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert doc["test"]["auc"] == pytest.approx(res.test["auc"]) and doc["finetune"]["lr"] == 3e-3
    split = pq.read_table(tmp_path / "ft" / "split.parquet").to_pydict()
    assert split["split"].count("test") == 72 and len(set(split["user_id"])) == 360
    # the saved model predicts what the trained one does
    model, meta = load_task_model(tmp_path / "ft", spec)
    assert meta["task"] == "binary"
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets

    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    test = td.subset(res.split.test)
    out, _ = predict(model, collator, test.rows, 64, torch.device("cpu"))
    assert task_metrics(test, out)["auc"] == pytest.approx(res.test["auc"], abs=1e-6)
    # and the logistic-regression baseline on bag-of-attribute counts finds the planted linear rule
    base = baseline_outputs(data, td, res.split, ("popular", "logreg"))
    report = evaluate_outputs(test, {"model": out, **base}, n_boot=200)
    assert report.metrics["logreg"]["auc"].value > 0.7
    assert report.metrics["popular"]["auc"].value == 0.5
    iv = report.metrics["model"]["auc"]
    assert iv.low < iv.value < iv.high and iv.high - iv.low < 0.4
    assert "model - logreg" in report.differences and "| logreg |" in report.markdown()


def test_finetune_multiclass_and_next_beat_chance_and_popularity(tiny, tmp_path):
    """Multiclass: which third of the genre ids a user buys most (3 classes).  Next: the genres a user bought;
    the fine-tuned ranking must beat a random one by far and be at least as good as the most-popular one."""
    root, data = tiny
    long = data.segment("long")
    k = long.attributes.index("genre")
    genres = data.vocab("long", "genre").to_pylist()
    top, bought = [], []
    for u in range(data.num_users):
        g = long.attr_ids[long.user_action_offsets[u]:long.user_action_offsets[u + 1], k].astype(np.int64)
        top.append(["low", "mid", "high"][int(np.argmax(np.bincount(g % 3, minlength=3)))])
        bought.append([genres[int(i) - 2] for i in np.unique(g) if i >= 2])
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(None, {**TINY, "finetune.epochs": 3})
    td = load_task(_write(tmp_path / "mc.parquet", user_id=data.user_ids, label=top), data, "multiclass")
    res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False)
    assert td.n_outputs == 3 and res.test["auc"] > 0.65, res.history  # chance: 0.5
    td = load_task(_write(tmp_path / "next.parquet", user_id=data.user_ids, label=bought), data, "next")
    res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False)
    assert {"map@10", "recall@10", "ndcg@10"} <= set(res.test)
    test = td.subset(res.split.test)
    chance = np.mean([score_metrics(test, np.random.default_rng(s).random((len(test), td.n_outputs)))["map@10"]
                      for s in range(5)])  # a random ranking
    assert res.test["map@10"] > chance + 0.1, (res.test, chance)
    # A few epochs from scratch learn the popularity prior first (the head's bias), not yet the personal signal.
    assert res.test["map@10"] >= res.popular["map@10"] - 0.02, (res.test, res.popular)


def test_frozen_encoder_and_linear_probe_leave_the_encoder_alone(tiny):
    root, data = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    td = load_task(root / "even.parquet", data, "binary")
    for over in ({"finetune.freeze_encoder": True}, {"finetune.probe_epochs": 2}):
        cfg = load_config(None, {**TINY, "finetune.epochs": 2, **over})
        enc = build_encoder(None, cfg.model, spec, seed=0)
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        res = finetune(data, td, cfg.finetune, enc, progress=False)
        after = res.model.encoder.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), over
        assert not torch.equal(res.model.head.bias, torch.zeros_like(res.model.head.bias))  # the head trained
    # after the probe epochs the encoder trains
    cfg = load_config(None, {**TINY, "finetune.epochs": 2, "finetune.probe_epochs": 1})
    enc = build_encoder(None, cfg.model, spec, seed=0)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = finetune(data, td, cfg.finetune, enc, progress=False)
    changed = [k for k, v in res.model.encoder.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("encoder.blocks") for k in changed) and not any(k.startswith("heads.") for k in changed)


def test_param_groups_apply_layer_decay_and_head_rate(tiny):
    root, data = tiny
    cfg = load_config(None, {**TINY, "model.layers": 3, "finetune.lr": 1e-3, "finetune.head_lr_mult": 10.0,
                             "finetune.layer_lr_decay": 0.5})
    from engine.downstream.finetune import TaskModel

    model = TaskModel(build_encoder(None, cfg.model, VocabSpec.from_manifest(data.manifest)), "binary", 1)
    lr_of = {}
    for g in param_groups(model, cfg.finetune):
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == (pytest.approx(1e-2), 0.01)
    assert lr_of[id(named["head.bias"])][1] == 0.0
    assert lr_of[id(named["encoder.encoder.blocks.2.mlp.fc.weight"])][0] == pytest.approx(1e-3)
    assert lr_of[id(named["encoder.encoder.blocks.0.mlp.fc.weight"])][0] == pytest.approx(2.5e-4)
    assert lr_of[id(named["encoder.encoder.norm.weight"])][0] == pytest.approx(1e-3)
    emb = [n for n in named if n.startswith("encoder.embeddings.")]
    assert emb and all(lr_of[id(named[n])][0] == pytest.approx(1.25e-4) for n in emb)
    assert not any(id(named[n]) in lr_of for n in named if n.startswith("encoder.heads."))
    # weight decay by role, as in pretraining: dense projections decay (the segment projection included),
    # embedding tables and LayerNorms do not
    proj = [n for n in named if n.startswith("encoder.embeddings.") and n.endswith(".proj.weight")]
    assert proj and all(lr_of[id(named[n])][1] == 0.01 for n in proj)
    assert lr_of[id(named["encoder.encoder.blocks.0.mlp.fc.weight"])][1] == 0.01
    assert all(lr_of[id(named[n])][1] == 0.0 for n in emb if ".attr." in n or n.endswith(".cls") or "norm" in n)


class _SpyBackend(TorchBackend):
    """One process standing in for one rank of two: the loop's all-reduce is the identity here."""

    def __init__(self, module, optimizer, users, steps):
        super().__init__(module, optimizer, DistContext(0, 1, 0, torch.device("cpu"), "", False), grad_clip=1.0)
        self.users, self.steps = users, steps

    def micro_step(self, inputs, micro):
        self.users.extend(inputs[0].users.tolist())
        return super().micro_step(inputs, micro)

    def optimizer_step(self, skip):
        self.steps.append(1)
        return super().optimizer_step(skip)


def test_backend_hook_and_ranks_see_disjoint_slices(tiny):
    """The backend hook (what DeepSpeed plugs into) runs every step; ranks split each global batch."""
    root, data = tiny
    cfg = load_config(None, {**TINY, "finetune.epochs": 1, "finetune.val_fraction": 0.0})
    td = load_task(root / "even.parquet", data, "binary")
    spec = VocabSpec.from_manifest(data.manifest)
    seen = {}
    for rank in (0, 1):
        users, steps = [], []
        finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False, rank=rank,
                 world_size=2, backend=lambda m, o, users=users, steps=steps: _SpyBackend(m, o, users, steps))
        seen[rank] = users
        assert len(steps) == -(-288 // 64)  # one step per global batch of 2 x 32 users
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 288  # every training user once per epoch
    # 257 users: the last global batch holds one user, which cannot feed both ranks; both skip it alike
    cfg = load_config(None, {**TINY, "finetune.epochs": 1, "finetune.val_fraction": 0.0,
                             "finetune.max_train_users": 257})
    counts = []
    for rank in (0, 1):
        steps = []
        finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False, rank=rank,
                 world_size=2, backend=lambda m, o, steps=steps: _SpyBackend(m, o, [], steps))
        counts.append(len(steps))
    assert counts == [4, 4]  # 257 = 4 x 64 + 1


def test_next_task_with_history_and_popularity_baselines(tiny):
    root, data = tiny
    genres = data.vocab("long", "genre").to_pylist()
    long = data.segment("long")
    k = long.attributes.index("genre")
    # label: the genres the user bought, so the history baseline ranks only relevant items first
    labels = []
    for u in range(data.num_users):
        g = long.attr_ids[long.user_action_offsets[u]:long.user_action_offsets[u + 1], k]
        labels.append([genres[int(i) - 2] for i in np.unique(g) if i >= 2])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d) / "next.parquet", user_id=data.user_ids, label=labels)
        td = load_task(path, data, "next")
    split = split_indices(len(td), 0.1, 0, 0.2)
    out = baseline_outputs(data, td, split, ("popular", "history", "logreg"), k=10)
    test = td.subset(split.test)
    report = evaluate_outputs(test, out, n_boot=100)
    m = {name: report.metrics[name]["map@10"].value for name in out}
    assert m["history"] == pytest.approx(1.0)
    assert m["popular"] < 0.9 * m["logreg"]  # logreg sees the genre counts and learns to repeat them
    assert out["popular"].shape == (len(test), 10) and (out["popular"] >= 2).all()  # reserved ids never ranked
    counts = item_counts(data, test.rows[:3], "long.genre", td.n_outputs)
    assert counts.sum() == sum(long.user_action_offsets[r + 1] - long.user_action_offsets[r] for r in test.rows[:3])
    assert history_scorer(data, td.subset(split.train), "long.genre")(test.rows[:2]).shape == (2, td.n_outputs)
    assert popularity_scores(td.subset(split.train), 4).shape == (4, td.n_outputs)


def test_logreg_matches_sklearn_on_the_same_features(tiny):
    from sklearn.linear_model import LogisticRegression

    from engine.downstream.baselines import _sparse, bag_of_attributes

    root, data = tiny
    td = load_task(root / "even.parquet", data, "binary")
    train = td.subset(np.arange(0, 300))
    model = fit_logreg(data, train, None, l2_grid=(1e-2,))
    layout = bag_layout(data)
    x = _sparse(bag_of_attributes(data, train.rows, layout), len(train), layout.n_features, model.scale)
    dense = x.to_dense().numpy().astype(np.float64)
    # ours: mean log-loss + l2/2 |w|^2 (bias free); sklearn: C * sum log-loss + 1/2 |w|^2  ->  C = 1 / (l2 n)
    ref = LogisticRegression(C=1.0 / (1e-2 * len(train)), tol=1e-10, max_iter=5000).fit(dense, train.y)
    ours = 1 / (1 + np.exp(-model.scores(data, train.rows)[:, 0]))
    assert np.abs(ours - ref.predict_proba(dense)[:, 1]).max() < 2e-3


def test_cli_finetune_then_evaluate_with_scratch_and_baselines(tiny, tmp_path):
    root, data = tiny
    sets = [f"{k}={v!r}".replace("'", '"') for k, v in {**TINY, "finetune.epochs": 2}.items()]
    assert main(["finetune", "--data", str(root / "tok"), "--labels", str(root / "even.parquet"), "--task", "binary",
                 "--init", "none", "--out", str(tmp_path / "ft"), "-q", "--set", *sets]) == 0
    assert main(["evaluate", "--data", str(root / "tok"), "--labels", str(root / "even.parquet"),
                 "--model", f"first={tmp_path / 'ft'}", "--scratch", "--baselines", "popular,logreg", "--boot", "100",
                 "--out", str(tmp_path / "ev"), "-q"]) == 0
    doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    (report,) = doc.values()
    assert set(report["metrics"]) == {"first", "scratch", "popular", "logreg"} and report["n_users"] == 72
    assert (tmp_path / "ev" / "curve_auc.png").stat().st_size > 1000
    assert "first - logreg" in (tmp_path / "ev" / "results.md").read_text()
    # the fine-tuned model's encoder exports embeddings too
    assert main(["embed", "--data", str(root / "tok"), "--checkpoint", str(tmp_path / "ft"), "--out",
                 str(tmp_path / "e.parquet"), "-q"]) == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 360


def test_task_data_subset_keeps_label_sets(tiny):
    td = TaskData("next", np.arange(4), label_offsets=np.array([0, 2, 2, 5, 6]),
                  label_ids=np.array([3, 4, 5, 6, 7, 8], np.int32), n_outputs=10)
    sub = td.subset(np.array([3, 0, 2]))
    assert sub.label_offsets.tolist() == [0, 1, 3, 6] and sub.label_ids.tolist() == [8, 3, 4, 5, 6, 7]
    lo, li = td.label_csr(np.array([2, 1]))
    assert lo.tolist() == [0, 3, 3] and li.tolist() == [5, 6, 7]


def test_cross_validated_auc_is_the_mean_over_folds():
    """Out-of-fold scores of different models are not on one scale: a per-fold constant pools to AUC != 0.5."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    folds = np.repeat(np.arange(3), 100)
    prior = np.array([y[folds != f].mean() for f in range(3)])[folds]  # what "popular" predicts, per fold
    td = TaskData("binary", np.arange(300), y=y)
    scores = (y + rng.normal(0, 1.0, 300))[:, None]
    r = evaluate_outputs(td, {"model": scores, "popular": prior[:, None]}, groups=folds, n_boot=200)
    assert r.metrics["popular"]["auc"].value == 0.5
    per_fold = np.mean([evaluate_outputs(td.subset(np.flatnonzero(folds == f)), {"m": scores[folds == f]},
                                         n_boot=10).metrics["m"]["auc"].value for f in range(3)])
    assert r.metrics["model"]["auc"].value == pytest.approx(per_fold)
    iv = r.metrics["model"]["auc"]
    assert iv.low < iv.value < iv.high



def test_cli_finetune_through_deepspeed_in_one_process(tiny, tmp_path):
    """cli/finetune.py --deepspeed_config: its own one-member gloo group (no MPI), ZeRO-1 on CPU, our AdamW
    groups inside the engine; it still learns the behavioural label and writes the same outputs."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from cli.finetune import main as ft_main

    root, data = tiny
    # fp32: bf16 matmuls on CPU would triple this test's time for nothing the GPU check does not cover.
    ds = tmp_path / "zero1.json"
    ds.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                              "gradient_clipping": "auto", "zero_optimization": {"stage": 1},
                              "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    sets = [f"{k}={v!r}".replace("'", '"') for k, v in {**TINY, "finetune.epochs": 3}.items()]

    def run(out, config):
        return ft_main(["--data", str(root / "tok"), "--labels", str(root / "even.parquet"), "--task", "binary",
                        "--init", "none", "--out", str(out), "-q", "--deepspeed_config", str(config), "--set", *sets])

    assert run(tmp_path / "ft", ds) == 0
    doc = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert len(doc["history"]) == 3 and doc["test"]["auc"] > 0.65, doc["history"]
    assert (tmp_path / "ft" / "model" / "model.json").exists()
    assert not dist.is_initialized()  # the group it made is gone
    # an explicit value that disagrees with [finetune] is refused before any work, by both entry points
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 0}}))
    assert run(tmp_path / "ft2", bad) == 2
    assert main(["finetune", "--data", str(root / "tok"), "--labels", str(root / "even.parquet"), "--task", "binary",
                 "--init", "none", "--out", str(tmp_path / "ft3"), "-q", "--deepspeed_config", str(bad),
                 "--set", *sets]) == 2
    assert not (tmp_path / "ft2").exists() and not (tmp_path / "ft3").exists()
    assert not dist.is_initialized()


def test_exclude_seen_items_are_never_ranked_by_models_or_baselines(tiny, tmp_path):
    """next with exclude_seen: the user's own items are masked in predict, the baselines and the metrics."""
    root, data = tiny
    genres = data.vocab("long", "genre").to_pylist()
    rng = np.random.default_rng(0)
    labels = [[genres[int(i)] for i in rng.choice(len(genres), 3, replace=False)] for _ in range(data.num_users)]
    path = _write(tmp_path / "next.parquet", user_id=data.user_ids, label=labels)
    plain = load_task(path, data, "next")
    td = load_task(path, data, "next", exclude_seen=True)
    long = data.segment("long")
    k = long.attributes.index("genre")
    for i in (0, 5, len(td) - 1):  # seen = the distinct genre ids of the user's actions
        r = td.rows[i]
        own = np.unique(long.attr_ids[long.user_action_offsets[r]:long.user_action_offsets[r + 1], k])
        assert td.seen_ids[td.seen_offsets[i]:td.seen_offsets[i + 1]].tolist() == own.tolist()
    sub = td.subset(np.array([5, 0]))
    assert sub.seen_ids[:sub.seen_offsets[1]].tolist() == td.seen_ids[td.seen_offsets[5]:td.seen_offsets[6]].tolist()

    def seen_ranked(t, top):
        """Seen items in the top 10 of users with at least 10 unseen items (others' lists fill up with seen ones)."""
        n_seen = np.diff(t.seen_offsets)
        return sum(len(np.intersect1d(top[j], t.seen_ids[t.seen_offsets[j]:t.seen_offsets[j + 1]]))
                   for j in range(len(t)) if t.n_outputs - 2 - n_seen[j] >= 10)

    split = split_indices(len(td), 0.1, 0, 0.3)
    test = td.subset(split.test)
    out = baseline_outputs(data, td, split, ("popular", "history"), k=10)
    assert seen_ranked(test, out["popular"]) == 0 and seen_ranked(test, out["history"]) == 0
    assert seen_ranked(test, baseline_outputs(data, plain, split, ("history",), k=10)["history"]) > 0
    cfg = load_config(None, TINY)
    spec = VocabSpec.from_manifest(data.manifest)
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets

    model = TaskModel(build_encoder(None, cfg.model, spec, seed=0), "next", td.n_outputs)
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    top = predict(model, collator, test.rows, 16, torch.device("cpu"), k=10, exclude=test.seen_csr())[0]
    assert seen_ranked(test, top) == 0 and (top >= 2).all()
    assert seen_ranked(test, predict(model, collator, test.rows, 16, torch.device("cpu"), k=10)[0]) > 0
    # score_metrics (what validation choices are made on) masks too: a score that ranks seen items first
    # scores as if they were not there
    scores = np.zeros((len(test), td.n_outputs))
    scores[np.repeat(np.arange(len(test)), np.diff(test.seen_offsets)), test.seen_ids] = 100.0
    assert score_metrics(test, scores)["map@10"] == pytest.approx(
        score_metrics(test, np.zeros_like(scores) + np.where(scores > 0, -np.inf, 0))["map@10"])


# -- fine-tuning switches: attention pooling, last-k layers, a wide count input -------------------------------
def _collator(data):
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets

    return Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest)), CollateConfig(select_prob=0.0))


def _padded_batch(data, n=24):
    b = _collator(data)(np.arange(n))
    assert (b.seq_lens < b.max_len).sum() > n // 2  # most users padded: the padding rules are exercised
    return b


def test_attention_pooling_starts_as_mean_ignores_padding_and_trains_with_the_head(tiny):
    from engine.downstream.finetune import Target

    root, data = tiny
    cfg = load_config(None, {**TINY, "finetune.head_lr_mult": 10.0})
    enc = build_encoder(None, cfg.model, VocabSpec.from_manifest(data.manifest), seed=0).eval()
    att, mean = TaskModel(enc, "binary", 1, "attention").eval(), TaskModel(enc, "binary", 1, "mean").eval()
    b = _padded_batch(data)
    with torch.no_grad():
        torch.testing.assert_close(att.embed(b), mean.embed(b), rtol=1e-6, atol=1e-6)  # q = 0: the mean
        att.pool.query.normal_(generator=torch.Generator().manual_seed(0))
        hidden, mask = enc.encode(b), b.padding_mask()
        pooled = att.pool(hidden, mask)
        # other values in the padded positions (huge ones too) change nothing
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)) * 1e3
        torch.testing.assert_close(att.pool(torch.where(mask[..., None], hidden, noise), mask), pooled,
                                   rtol=0, atol=0)
        assert not torch.allclose(pooled, mean.embed(b), atol=1e-3)  # a learned q weighs the tokens
        # by hand: softmax of q . h over each user's real tokens
        u = int(np.argmin(b.seq_lens.numpy()))
        h = hidden[u, :int(b.seq_lens[u])]
        torch.testing.assert_close(pooled[u], torch.softmax(h @ att.pool.query, 0) @ h, rtol=1e-5, atol=1e-6)
    att.pool.query.data.zero_()
    att.train()
    att(b, Target(y=torch.from_numpy(np.arange(b.batch_size) % 2))).backward()
    assert att.pool.query.grad is not None and att.pool.query.grad.abs().sum() > 0
    lr_of = {id(p): g["lr"] for g in param_groups(att, cfg.finetune) for p in g["params"]}
    assert lr_of[id(att.pool.query)] == pytest.approx(cfg.finetune.lr * 10.0) == lr_of[id(att.head.weight)]


def test_pool_layers_pools_the_mean_of_the_last_k_layers(tiny):
    from common.typed_config import ConfigError
    from engine.model.userbert import pool

    root, data = tiny
    cfg = load_config(None, {**TINY, "model.layers": 3})
    enc = build_encoder(None, cfg.model, VocabSpec.from_manifest(data.manifest), seed=0).eval()
    b = _padded_batch(data)
    with torch.no_grad():
        # by hand, block by block: each state read through the final LayerNorm (what "final state" means)
        x, mask = enc.embeddings(b), b.padding_mask()
        key_bias = x.new_zeros(b.batch_size, 1, 1, b.max_len).masked_fill(~mask[:, None, None, :], float("-inf"))
        states = []
        for block in enc.encoder.blocks:
            x = block(x, key_bias)
            states.append(enc.encoder.norm(x))
        assert torch.equal(enc.encode(b, layers=1), states[-1]) and torch.equal(enc.encode(b), states[-1])
        last2 = (states[-1] + states[-2]) / 2
        torch.testing.assert_close(enc.encode(b, layers=2), last2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(enc.encode(b, layers=3), sum(states) / 3, rtol=1e-6, atol=1e-6)
        for pooling in ("cls", "mean"):
            # pool_layers = 1 is today's user embedding, exactly
            assert torch.equal(TaskModel(enc, "binary", 1, pooling).embed(b), enc.user_embedding(b, pooling))
            torch.testing.assert_close(TaskModel(enc, "binary", 1, pooling, pool_layers=2).embed(b),
                                       pool(last2, b, pooling), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(TaskModel(enc, "binary", 1, "attention", pool_layers=2).embed(b),
                                   pool(last2, b, "mean"), rtol=1e-5, atol=1e-6)
    for k in (0, 4):
        with pytest.raises(ConfigError, match=r"finetune.pool_layers: must be in 1..3 \(the encoder's layers\)"):
            TaskModel(enc, "binary", 1, "mean", pool_layers=k)
    with pytest.raises(ConfigError, match="pool_layers: must be >= 1"):
        load_config(None, {"finetune.pool_layers": 0})
    # through finetune: a 1-layer encoder has no second-to-last layer
    td = load_task(root / "even.parquet", data, "binary")
    small = load_config(None, {**TINY, "finetune.pool_layers": 2})
    with pytest.raises(ConfigError, match=r"pool_layers: must be in 1..1"):
        finetune(data, td, small.finetune, build_encoder(None, small.model, VocabSpec.from_manifest(data.manifest)),
                 progress=False)


def test_wide_counts_start_at_zero_and_are_log1p_of_the_bag_of_counts(tiny):
    from common.typed_config import ConfigError
    from engine.downstream.finetune import Target
    from engine.downstream.wide import WideCounts

    root, data = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(None, {**TINY, "finetune.head_lr_mult": 10.0})
    enc = build_encoder(None, cfg.model, spec, seed=0).eval()
    b = _padded_batch(data)
    y = Target(y=torch.from_numpy(np.arange(b.batch_size) % 3))
    torch.manual_seed(0)
    plain = TaskModel(enc, "multiclass", 3)
    torch.manual_seed(0)
    wide = TaskModel(enc, "multiclass", 3, wide=True)
    with torch.no_grad():
        assert torch.equal(wide(b), plain(b)) and torch.equal(wide(b, y), plain(b, y))  # zero at start
    wide(b, y).backward()
    assert wide.wide.table.weight.grad.abs().sum() > 0 and wide.wide.bias is None  # the head has the bias
    lr_of = {id(p): g["lr"] for g in param_groups(wide, cfg.finetune) for p in g["params"]}
    assert lr_of[id(wide.wide.table.weight)] == pytest.approx(cfg.finetune.lr * 10.0)
    # the features: with W selecting long.genre's columns, the output is log(1 + count) of each genre,
    # against the counts the baselines compute from the tokenized arrays
    n_genre = data.vocab("long", "genre").__len__() + 2  # the reserved ids included
    counts = WideCounts(spec, n_genre, bias=False)
    s = [seg.name for seg in spec.segments].index("long")
    start = counts.col_start[s][spec.segments[s].attributes.index("genre")]
    assert spec.segments[s].vocab_sizes[spec.segments[s].attributes.index("genre")] == n_genre
    with torch.no_grad():
        counts.table.weight[start + torch.arange(1, n_genre), torch.arange(1, n_genre)] = 1.0
        got = counts(b).numpy()
    want = np.log1p(item_counts(data, b.users.numpy(), "long.genre", n_genre))
    assert want[:, 1:].sum() > 10
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-6, atol=1e-6)  # id 0 (padding) is not a column
    assert (got[:, 0] == 0).all()
    with pytest.raises(ConfigError, match="finetune.wide: only binary and multiclass tasks"):
        TaskModel(enc, "next", n_genre, wide=True)


def test_wide_learns_a_count_label_that_the_frozen_encoder_alone_does_not(tiny, tmp_path):
    """Label: does the user buy genre g more often than the median user.  The same frozen encoder, head and
    3 epochs; with ``wide`` the model reads the counts directly.  Two genres (the two most bought)."""
    root, data = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    n_genre = data.vocab("long", "genre").__len__() + 2
    counts = item_counts(data, np.arange(data.num_users), "long.genre", n_genre)
    aucs = {False: [], True: []}
    for g in np.argsort(-counts.sum(0), kind="stable")[:2]:
        label = (counts[:, g] > np.median(counts[:, g])).astype(np.int8)
        assert 0.2 < label.mean() < 0.8
        td = load_task(_write(tmp_path / f"g{g}.parquet", user_id=data.user_ids, label=label), data, "binary")
        for wide in (False, True):
            cfg = load_config(None, {**TINY, "finetune.freeze_encoder": True, "finetune.epochs": 3,
                                     "finetune.head_lr_mult": 10.0, "finetune.wide": wide})
            res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False)
            aucs[wide].append(res.test["auc"])
    # measured: without 0.857 and 0.674, with 0.940 and 0.949
    assert min(aucs[True]) > 0.85 and all(w > n for w, n in zip(aucs[True], aucs[False])), aucs
    assert np.mean(aucs[True]) > np.mean(aucs[False]) + 0.08, aucs


def test_finetuned_model_with_all_switches_round_trips_and_exports_its_pooling(tiny, tmp_path):
    from engine.downstream.user_embeddings import export_embeddings
    from engine.model.export import save_model

    root, data = tiny
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(None, {**TINY, "model.layers": 2, "finetune.epochs": 2, "finetune.pooling": "attention",
                             "finetune.pool_layers": 2, "finetune.wide": True})
    td = load_task(root / "even.parquet", data, "binary")
    res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec, seed=0), progress=False,
                   out_dir=tmp_path / "ft")
    model, meta = load_task_model(tmp_path / "ft", spec)
    assert (meta["pooling"], meta["pool_layers"], meta["wide"]) == ("attention", 2, True)
    assert (model.pooling, model.pool_layers) == ("attention", 2)
    trained = res.model.state_dict()
    assert res.model.pool.query.abs().sum() > 0 and res.model.wide.table.weight.abs().sum() > 0  # they trained
    assert set(model.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    test = td.subset(res.split.test)
    cpu = torch.device("cpu")
    want, _ = predict(res.model, _collator(data), test.rows, 64, cpu)
    got, _ = predict(model, _collator(data), test.rows, 64, cpu)
    np.testing.assert_array_equal(got, want)
    assert task_metrics(test, got)["auc"] == pytest.approx(res.test["auc"], abs=1e-6)
    # embed: a fine-tuned dir exports its own representation (attention over the mean of the last 2 layers) ...
    export_embeddings(root / "tok", tmp_path / "ft", tmp_path / "e.parquet", progress=False)
    emb = np.stack(pq.read_table(tmp_path / "e.parquet").column("embedding").to_numpy(zero_copy_only=False))
    rows = np.array([0, 7, 200])
    with torch.no_grad():
        np.testing.assert_allclose(emb[rows], model.eval().embed(_collator(data)(rows)).numpy(), rtol=1e-4, atol=1e-5)
    # ... and a pretrained model has no attention weights to export with
    save_model(tmp_path / "pre", model.encoder, model.encoder.cfg, spec)
    with pytest.raises(ValueError, match="pooling 'attention' has weights only in a model fine-tuned with"):
        export_embeddings(root / "tok", tmp_path / "pre", tmp_path / "x.parquet", pooling="attention", progress=False)
    assert not (tmp_path / "x.parquet").exists()
