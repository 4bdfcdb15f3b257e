"""End to end on tiny synthetic data: pretrain lowers the loss, export round-trips, fine-tuning,
embedding export, the demo's stages, and the CLI."""

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cli.main import build_parser, main
from engine.config import VocabSpec, load_config
from engine.data.loader import epoch_plan
from engine.demo import run_demo
from engine.downstream.finetune import build_encoder, finetune
from engine.downstream.tasks import load_task
from engine.downstream.user_embeddings import export_embeddings
from engine.model.export import load_model_description, load_weights, save_model
from engine.model.userbert import UserBERT
from engine.train.pretrain import pretrain
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate

TINY = {"model.hidden": 32, "model.layers": 1, "model.heads": 2, "model.dropout": 0.0, "model.attn_dropout": 0.0,
        "train.batch_size": 16, "train.lr": 3e-3, "train.device": "cpu", "train.log_every": 1,
        "finetune.epochs": 2, "finetune.batch_size": 32}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    generate(root / "raw", 400, seed=1, n_genres=60, n_shops=200, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", shard_users=150, progress=False)
    return root


@pytest.fixture(scope="module")
def pretrained(tok):
    cfg = load_config(None, {**TINY, "train.steps": 80})
    return pretrain(cfg, tok / "tok", tok / "run", progress=False)


def test_pretraining_lowers_the_loss(pretrained):
    losses = np.array(pretrained.losses)
    assert len(losses) == 80 and np.isfinite(losses).all()
    # Measured over seeds 0-2: the last 10 steps' mean is 0.85-0.89 of the first 10's (the mean of 10 steps
    # varies by ~0.1 of ~14 nats); 1.0 would mean no learning at all.
    assert losses[-10:].mean() < 0.9 * losses[:10].mean()
    rows = [json.loads(line) for line in (pretrained.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and {"loss", "lr", "grad_norm", "users_per_s", "loss/long.genre"} <= set(rows[0])
    assert (pretrained.run_dir / "loss.png").stat().st_size > 1000
    assert any((pretrained.run_dir / "tensorboard").iterdir())


def test_export_round_trips_and_is_not_pickle(pretrained, tok):
    model_cfg, spec, desc = load_model_description(pretrained.model_dir)
    assert desc["meta"]["steps"] == 80
    assert (pretrained.model_dir / "model.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    model = UserBERT(model_cfg, spec)
    model.load_state_dict(load_weights(pretrained.model_dir))
    again = tok / "again"
    save_model(again, model, model_cfg, spec)
    a, b = load_weights(pretrained.model_dir), load_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_next_and_binary(pretrained, tok):
    data = open_tokenized(tok / "tok")
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(None, TINY)
    td = load_task(tok / "raw" / "labels" / "next_genre.parquet", data, "next", "long.genre")
    assert td.n_outputs == spec.segment("long").vocab_sizes[spec.segment("long").attributes.index("genre")]
    res = finetune(data, td, cfg.finetune, build_encoder(pretrained.run_dir, cfg.model, spec), progress=False,
                   pretrained=True, out_dir=tok / "ft")
    _check_result(res, data, td, spec, tok / "ft", "map@10")
    td = load_task(tok / "raw" / "labels" / "is_parent.parquet", data, "binary")
    res = finetune(data, td, cfg.finetune, build_encoder(None, cfg.model, spec), progress=False, out_dir=tok / "ft2")
    _check_result(res, data, td, spec, tok / "ft2", "auc")
    train_y, test_y = td.subset(res.split.train).y, td.subset(res.split.test).y
    assert res.popular["auc"] == 0.5  # a constant score
    assert res.popular["accuracy"] == pytest.approx(np.mean(test_y == int(train_y.mean() > 0.5)))  # the prior's class


def _check_result(res, data, td, spec, ft_dir, metric):
    """The reported metrics are those of the epoch with the best validation metric, they are what the saved
    model scores on the test users, and result.json says the same."""
    assert [h["epoch"] for h in res.history] == list(range(len(res.history))) and len(res.history) == 2
    best = max(range(len(res.history)), key=lambda e: res.history[e][f"val.{metric}"])
    assert res.best_epoch == best
    assert res.test == {k[5:]: v for k, v in res.history[best].items() if k.startswith("test.")}
    assert res.val[metric] == res.history[best][f"val.{metric}"]
    assert all(np.isfinite(h["train_loss"]) and h["train_loss"] > 0 for h in res.history)
    doc = json.loads((ft_dir / "result.json").read_text())
    assert doc["task"] == td.task and doc["best_epoch"] == best and doc["test"] == pytest.approx(res.test)
    assert sum(res.sizes.values()) == len(td.rows) and res.sizes["test"] == len(res.split.test) > 0
    from engine.data.collate import CollateConfig, Collator
    from engine.downstream.finetune import load_task_model, predict
    from engine.downstream.metrics import task_metrics
    from engine.model.userbert import user_attr_offsets

    model, meta = load_task_model(ft_dir, spec)
    assert meta["task"] == td.task
    test = td.subset(res.split.test)
    out, _ = predict(model, Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0)), test.rows, 64,
                     torch.device("cpu"))
    assert task_metrics(test, out) == pytest.approx(res.test, abs=1e-6)


def test_finetune_rejects_a_model_from_other_data(pretrained, tmp_path):
    generate(tmp_path / "raw", 120, seed=9, n_genres=40, n_shops=90, progress=False)
    tokenize(load_schema(tmp_path / "raw" / "schema.toml"), tmp_path / "tok", progress=False)
    spec = VocabSpec.from_manifest(open_tokenized(tmp_path / "tok").manifest)
    with pytest.raises(ValueError, match="other segments or vocabularies"):
        build_encoder(pretrained.run_dir, None, spec)


def test_embed_writes_one_row_per_user(pretrained, tok):
    out = tok / "emb.parquet"
    n = export_embeddings(tok / "tok", pretrained.run_dir, out, batch_size=64, progress=False, rows_per_group=150)
    table = pq.read_table(out)
    data = open_tokenized(tok / "tok")
    assert n == table.num_rows == data.num_users
    assert table.column("user_id").to_pylist() == data.user_ids.to_pylist()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (n, 32) and np.isfinite(emb).all() and emb.std(0).min() > 0


def test_epoch_plan_splits_ranks_disjointly_and_groups_lengths():
    lengths = np.random.default_rng(0).integers(0, 100, 1000)
    plans = [epoch_plan(1000, 8, seed=3, epoch=1, rank=r, world_size=4, lengths=lengths) for r in range(4)]
    seen = np.concatenate([b for p in plans for b in p])
    assert len(seen) == len(np.unique(seen)) == (1000 // 32) * 32
    assert all(len(b) == 8 for p in plans for b in p)
    grouped = epoch_plan(1000, 32, seed=3, epoch=1, lengths=lengths)
    plain = epoch_plan(1000, 32, seed=3, epoch=1)
    waste = lambda plan: np.mean([1 - lengths[b].mean() / max(lengths[b].max(), 1) for b in plan])
    assert waste(grouped) < 0.5 * waste(plain)
    assert not np.array_equal(epoch_plan(1000, 32, 3, 2, lengths=lengths)[0], grouped[0])  # reshuffled per epoch


def test_demo_stages_on_a_tiny_config(tmp_path):
    cfg = load_config(None, {**TINY, "train.steps": 15, "finetune.epochs": 1, "demo.users": 200,
                             "demo.genres": 40, "demo.shops": 80, "demo.shard_users": 100})
    result = run_demo(cfg, tmp_path / "out", progress=False)
    models = {(r["task"], r["model"]) for r in result.rows}
    for task in ("next_genre", "is_parent", "targeting"):
        assert {(task, m) for m in ("pretrained", "scratch", "popular")} <= models
    text = result.report.read_text()
    assert "| next_genre | pretrained |" in text and (tmp_path / "out" / "pretrain" / "loss.png").exists()
    assert set(result.seconds) == {"synth", "tokenize", "pretrain", "finetune"}


def test_cli_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    every = {"synth", "tokenize", "merge", "inspect", "pretrain", "finetune", "evaluate", "embed", "demo"}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == every
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert every <= listed, every - listed


def test_cli_synth_tokenize_and_config_errors(tmp_path, caplog):
    assert main(["synth", "--users", "50", "--seed", "2", "--out", str(tmp_path / "raw"), "-q"]) == 0
    assert main(["tokenize", "--schema", str(tmp_path / "raw" / "schema.toml"), "--out", str(tmp_path / "tok"),
                 "-q"]) == 0
    assert json.loads((tmp_path / "tok" / "manifest.json").read_text())["counts"]["users"] == 50
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nlayers = 'four'\n")
    rc = main(["pretrain", "--data", str(tmp_path / "tok"), "--out", str(tmp_path / "run"), "--config", str(bad)])
    assert rc == 2 and "model.layers: expected int" in caplog.text


def test_next_labels_drop_unknown_items_and_empty_users(tok, tmp_path):
    import pyarrow as pa

    data = open_tokenized(tok / "tok")
    genres = data.vocab("long", "genre").to_pylist()
    users = data.user_ids.to_pylist()
    labels = pa.table({"user_id": users[:4] + [123456789],
                       "label": [[genres[0], "no-such-genre"], [], [genres[1], genres[2]], ["nope"], [genres[0]]]})
    pq.write_table(labels, tmp_path / "l.parquet")
    td = load_task(tmp_path / "l.parquet", data, "next", "long.genre")
    # user 1 (empty) and user 3 (only unknown) have nothing to rank against; the unknown user is counted
    assert td.unknown_users == 1 and len(td) == 2
    assert td.rows.tolist() == [0, 2]
    assert td.label_offsets.tolist() == [0, 1, 3] and td.label_ids.tolist() == [2, 3, 4]
