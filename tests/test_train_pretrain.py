"""Single-process pretraining (`userbert-engine pretrain`, the plain-torch backend with its own gloo group):
files, exact resume after a periodic checkpoint and after SIGTERM, bad-step handling, and the errors that
must come before any work."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli.main import main
from engine.config import load_config
from engine.model.userbert import UserBERT
from engine.train.loop import BadStepsError, TrainingSetupError
from engine.train.pretrain import TrainingInterrupted, pretrain
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.hidden": 32, "model.layers": 1, "model.heads": 2, "model.dropout": 0.1, "model.attn_dropout": 0.1,
        "train.batch_size": 16, "train.lr": 3e-3, "train.device": "cpu", "train.log_every": 1, "train.num_threads": 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_single")
    generate(root / "raw", 300, seed=2, n_genres=40, n_shops=100, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", shard_users=120, progress=False)
    return root / "tok"


def _sets(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in d.items()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["step_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_cli_single_process_run(tok, tmp_path):
    run = tmp_path / "run"
    rc = main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "30", "-q",
               "--set", *_sets({**TINY, "train.checkpoint_every": 10, "train.keep_checkpoints": 2})])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30))
    losses = np.array([r["step_loss"] for r in rows])
    assert np.isfinite(losses).all() and losses[-5:].mean() < 0.9 * losses[:5].mean()
    need = {"loss", "lr", "grad_norm", "users_per_s", "tokens_per_s", "data_wait_s", "data_wait_frac",
            "mem/rss_mb", "mem/peak_rss_mb", "loss/long.genre", "loss/short.shop", "skipped_steps"}
    assert need <= set(rows[-1]) and rows[-1]["tokens_per_s"] > rows[-1]["users_per_s"] > 0
    assert (run / "loss.png").stat().st_size > 1000 and any((run / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000030"]  # every 10, at the end, the last 2 kept
    assert not list((run / "checkpoints").rglob("*.pt"))  # the plain-torch backend writes no pickles
    desc = json.loads((run / "model" / "model.json").read_text())
    assert desc["meta"]["steps"] == 30 and desc["meta"]["backend"] == "torch"
    model = UserBERT(load_config(None, TINY).model, _spec(tok))
    model.load_state_dict(load_file(run / "model" / "model.safetensors"))

    # The same directory again: refused without --resume/--overwrite; --resume continues to a new end.
    assert main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "30", "-q", "--set", *_sets(TINY)]) == 2
    assert main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "33", "-q", "--resume",
                 "--set", *_sets(TINY)]) == 0
    assert sorted(_losses(run)) == list(range(33))
    assert main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "3", "-q", "--overwrite",
                 "--set", *_sets(TINY)]) == 0
    assert sorted(_losses(run)) == [0, 1, 2]


def _spec(tok):
    from engine.config import VocabSpec
    from tokenizer.shards import open_tokenized

    return VocabSpec.from_manifest(open_tokenized(tok).manifest)


RESUME = {**TINY, "train.micro_batch_size": 8, "train.checkpoint_every": 5, "train.steps": 14,
          "train.warmup_steps": 3, "train.schedule": "cosine"}


@pytest.fixture(scope="module")
def uninterrupted(tok, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    return pretrain(load_config(None, RESUME), tok, run, progress=False)


def test_resume_from_a_periodic_checkpoint_is_exact(tok, tmp_path, uninterrupted):
    """Accumulation (2 micro-batches), dropout, warmup + cosine: steps 5.. after resuming equal the originals."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir, run)
    for d in ("model", "checkpoints/step_00000010", "checkpoints/step_00000014"):
        shutil.rmtree(run / d)
    res = pretrain(load_config(None, RESUME), tok, run, progress=False, resume=True)
    assert res.start_step == 5 and res.end_step == 14
    assert res.losses == uninterrupted.losses[5:]
    assert _losses(run) == _losses(uninterrupted.run_dir)
    a, b = load_file(run / "model" / "model.safetensors"), load_file(uninterrupted.model_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingSetupError, match=r"global_batch: checkpoint 16, this run 32"):
        pretrain(load_config(None, {**RESUME, "train.batch_size": 32}), tok, run, progress=False, resume=True)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_exact(tok, tmp_path, uninterrupted):
    run = tmp_path / "run"
    cfg = load_config(None, {**RESUME, "train.checkpoint_every": 0})

    def kill_after_three_steps():
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_three_steps, daemon=True)
    killer.start()
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM") as stop:
        pretrain(cfg, tok, run, progress=False)
    killer.join()
    first = stop.value.result
    assert first.stopped == "SIGTERM" and first.model_dir is None and not (run / "model").exists()
    assert 3 <= first.end_step < 14 and first.checkpoint.name == f"step_{first.end_step:08d}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is gone again
    second = pretrain(cfg, tok, run, progress=False, resume=True)
    assert second.start_step == first.end_step and second.stopped is None
    assert first.losses + second.losses == uninterrupted.losses


def test_non_finite_losses_are_skipped_then_abort(tok, tmp_path, monkeypatch):
    real = UserBERT.pretrain_loss
    calls = {"n": 0}

    def sometimes_nan(self, batch, masking):
        loss, stats = real(self, batch, masking)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] in bad else (loss, stats)

    monkeypatch.setattr(UserBERT, "pretrain_loss", sometimes_nan)
    bad = {3}
    res = pretrain(load_config(None, {**TINY, "train.steps": 6}), tok, tmp_path / "a", progress=False)
    assert res.skipped_steps == 1 and np.isnan(res.losses[2]) and np.isfinite(res.losses[3:]).all()
    bad = set(range(100))
    with pytest.raises(BadStepsError, match=r"3 consecutive bad steps .*--resume"):
        pretrain(load_config(None, {**TINY, "train.steps": 6, "train.max_bad_steps": 3}), tok, tmp_path / "b",
                 progress=False)


def test_bad_setups_fail_before_any_work(tok, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    fp16 = ["pretrain", "--data", str(tok), "--out", str(out), "--deepspeed_config",
            str(ROOT / "configs" / "ds" / "zero2_fp16.json"), "--set", *_sets(TINY)]
    assert main(fp16) == 2 and "fp16 needs a GPU" in caplog.text
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(out), "--set", *_sets(TINY)]) == 2
    assert "manifest.json missing" in caplog.text
    assert not out.exists()  # nothing was written
    with pytest.raises(ValueError, match="micro_batch_size: batch_size .16. must be a multiple"):
        load_config(None, {**TINY, "train.micro_batch_size": 5})
    monkeypatch.setenv("WORLD_SIZE", "3")  # as a launcher with 3 ranks would set it
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        pretrain(load_config(None, TINY), tok, out, progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    (out / "checkpoints" / "step_00000004" / "trainer_state.json").write_text('{"version": 1, "step": 4}')
    with pytest.raises(TrainingSetupError, match="--resume to continue it, --overwrite to start over"):
        pretrain(load_config(None, TINY), tok, out, progress=False)


def test_plain_torch_needs_no_deepspeed(tok, tmp_path, monkeypatch):
    """The GPU image has no DeepSpeed: the plain path must not import it, and asking for it says so first."""
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    res = pretrain(load_config(None, {**TINY, "train.steps": 2}), tok, tmp_path / "a", progress=False)
    assert res.steps == 2 and res.backend == "torch"
    with pytest.raises(TrainingSetupError, match="needs DeepSpeed"):
        pretrain(load_config(None, TINY), tok, tmp_path / "b", progress=False,
                 deepspeed_config=ROOT / "configs" / "ds" / "zero0_bf16.json")
    assert not (tmp_path / "b").exists()


def test_users_without_words_are_left_out_and_empty_steps_counted(tmp_path, caplog, monkeypatch):
    """A user-table row with no events has nothing to predict.  Kept, such users fill whole batches under
    length grouping and those steps predict nothing (loss 0); pretraining leaves them out, and counts any
    step with no masked word (all of them when masking is off)."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenizer.schema import schema_from_dict

    rng = np.random.default_rng(0)
    n = 4000
    t0 = 1767225600  # 2026-01-01
    pq.write_table(pa.table({"user_id": rng.integers(0, 40, n), "ts": t0 + rng.integers(0, 20 * 86400, n),
                             "item": rng.integers(0, 30, n)}), tmp_path / "ev.parquet")
    pq.write_table(pa.table({"user_id": np.arange(100), "age": rng.integers(18, 70, 100)}), tmp_path / "users.parquet")
    schema = schema_from_dict({
        "data": {"window_start": "2026-01-01T00:00:00", "window_end": "2026-01-21T00:00:00", "users": "users.parquet"},
        "segments": {"long": {"path": "ev.parquet", "word_rule": "daily", "position_unit": "day",
                              "attributes": [{"name": "item", "dim": 16}]}},
        "user_attributes": [{"name": "age", "buckets": [30, 50]}]}, tmp_path)
    tokenize(schema, tmp_path / "tok", progress=False)
    cfg = load_config(None, {**TINY, "train.steps": 8, "train.checkpoint_every": 0})
    with caplog.at_level(logging.INFO, logger="userbert"):
        res = pretrain(cfg, tmp_path / "tok", tmp_path / "run", progress=False)
    assert "60 of 100 users have no behaviour word: left out of pretraining" in caplog.text
    assert res.empty_steps == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["masked_words"] > 0 and r["empty_steps"] == 0 for r in rows)

    # The counter counts: keeping every user (the old selection), length grouping puts the 60 users without
    # words into batches of their own, steps with nothing to predict.
    import engine.train.pretrain as pretraining

    monkeypatch.setattr(pretraining, "_users_with_words", lambda data, spec, rows: np.arange(data.num_users))
    res = pretrain(cfg, tmp_path / "tok", tmp_path / "run-all", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run-all" / "metrics.jsonl").read_text().splitlines()]
    empty = [r["step"] for r in rows if r["masked_words"] == 0]
    assert len(empty) >= 3 and res.empty_steps == len(empty) and rows[-1]["empty_steps"] == len(empty)
    assert all(r["step_loss"] == 0.0 for r in rows if r["masked_words"] == 0)


def test_user_bag_objective_and_snapshots(tok, tmp_path):
    """model.user_bag_weight adds the user-level loss (logged, learnt: it falls) and its heads go into the exported
    model; train.export_steps writes the model at those steps too."""
    from engine.config import VocabSpec
    from engine.downstream.finetune import build_encoder
    from tokenizer.shards import open_tokenized

    run = tmp_path / "run"
    rc = main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "40", "-q", "--set",
               *_sets({**TINY, "model.user_bag_weight": 1.0, "train.export_steps": [10, 25, 40]})])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bag = np.array([r["loss/user_bag"] for r in rows])
    assert np.isfinite(bag).all() and bag[-5:].mean() < 0.9 * bag[:5].mean()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("model_step")) == ["model_step10",
                                                                                        "model_step25"]
    spec = VocabSpec.from_manifest(open_tokenized(tok).manifest)
    early, final = build_encoder(run / "model_step10", None, spec), build_encoder(run, None, spec)
    assert final.bag_heads is not None and final.cfg.user_bag_weight == 1.0
    w10, w40 = early.bag_heads.heads["long"]["genre"].weight, final.bag_heads.heads["long"]["genre"].weight
    assert w10.shape == w40.shape and not torch.equal(w10, w40)


def test_user_bag_loss_equals_a_per_user_reference():
    """The bag loss: per user and attribute, cross entropy against the user's value counts / total, mean over users
    with actions, summed over heads; checked against a loop over users on a hand-made batch."""
    from engine.config import ModelConfig, SegmentVocab, VocabSpec
    from engine.data.batch import Batch, SegmentBatch
    from engine.model.heads import UserBagHeads

    torch.manual_seed(0)
    spec = VocabSpec(segments=[SegmentVocab("long", ["genre", "shop"], [6, 9], [4, 4], 10, 8)])
    heads = UserBagHeads(ModelConfig(hidden=8, heads=2), spec)
    # 3 users (T = 4): user 0 has words of 2 and 1 actions, user 1 none, user 2 one word of 3 actions (a padding id)
    attr = torch.tensor([[2, 3], [2, 4], [5, 3], [1, 0], [3, 8], [3, 8]], dtype=torch.int32)
    sb = SegmentBatch(attr_ids=attr, word_offsets=torch.tensor([0, 2, 3, 6], dtype=torch.int32),
                      word_pos=torch.zeros(3, dtype=torch.int32), word_slot=torch.tensor([1, 2, 9]),
                      masked=torch.zeros(0, dtype=torch.int64), masked_zero=torch.zeros(0, dtype=torch.bool),
                      label_offsets=[], label_ids=[])
    batch = Batch([sb], torch.zeros(3, 0, dtype=torch.int32), torch.tensor([3, 1, 2], dtype=torch.int32), 4,
                  torch.arange(3))
    pooled = torch.randn(3, 8)
    loss, stats = heads(pooled, batch)
    want = 0.0
    for k, head in enumerate(heads.heads["long"].values()):
        logp = torch.log_softmax(head(pooled), -1)
        per_user = []
        for u, acts in ((0, [0, 1, 2]), (2, [3, 4, 5])):
            ids = [int(attr[a, k]) for a in acts if attr[a, k] > 0]
            per_user.append(-sum(logp[u, i] for i in ids) / len(ids))
        want = want + sum(per_user) / 2
    torch.testing.assert_close(loss, want)
    assert stats["loss/user_bag"] == pytest.approx(float(want.detach()), rel=1e-5)


def test_info_nce_equals_a_float64_reference_and_prefers_matching_views():
    from engine.model.userbert import info_nce, masked_mean

    torch.manual_seed(1)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    a64 = a.double() / a.double().norm(dim=1, keepdim=True)
    b64 = b.double() / b.double().norm(dim=1, keepdim=True)
    sim = a64 @ b64.T / 0.2
    want = 0.0
    for i in range(5):  # -log softmax of the own view, rows (a -> b) and columns (b -> a)
        want += -(sim[i, i] - torch.logsumexp(sim[i], 0)) - (sim[i, i] - torch.logsumexp(sim[:, i], 0))
    torch.testing.assert_close(info_nce(a, b, 0.2).double(), want / 10, rtol=1e-5, atol=1e-6)
    assert info_nce(a, a + 0.01 * torch.randn(5, 7), 0.2) < info_nce(a, b, 0.2)
    h = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False, True], [True, True, True]])
    torch.testing.assert_close(masked_mean(h, keep)[0], (h[0, 0] + h[0, 2]) / 2)


def test_contrastive_objective_trains_and_changes_nothing_when_off(tok, tmp_path):
    """model.contrastive_weight adds an InfoNCE term between the pass and a random crop (logged, learnt: it
    falls); at 0 the pretraining loss is exactly the paper's masked-word loss."""
    from engine.config import VocabSpec
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets
    from tokenizer.shards import open_tokenized

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(tok), "--out", str(run), "--steps", "40", "-q", "--set",
                 *_sets({**TINY, "model.contrastive_weight": 1.0})]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    c = np.array([r["loss/contrastive"] for r in rows])
    assert np.isfinite(c).all() and c[-5:].mean() < 0.9 * c[:5].mean()
    data = open_tokenized(tok)
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(None, {**TINY, "model.dropout": 0.0, "model.attn_dropout": 0.0})
    torch.manual_seed(0)
    model = UserBERT(cfg.model, spec).eval()
    batch = Collator(data, user_attr_offsets(spec), CollateConfig(0.3, 0.8))(np.arange(24))
    loss, stats = model.pretrain_loss(batch, cfg.masking)
    ref, _ = model.heads(model.encode(batch), batch, cfg.masking)
    assert torch.equal(loss, ref) and "loss/contrastive" not in stats
