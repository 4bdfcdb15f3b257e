"""A whole pretraining step (forward, backward, clipping, AdamW) at the paper's model, ours vs two baselines.

    pytest benchmarks/test_train_step.py --benchmark-only

Providers (same model sizes: configs/paper.toml's [model], L=4, H=128, A=4, dropout 0.1; same users per
optimizer step, B = 256; the same masking; AdamW lr 1e-4 and clipping at 1.0 for all):

- ``ours``: engine.model.userbert.UserBERT fed by our collate with length-grouped batches (engine/data/loader.py),
  gather-concat-mean embeddings, SDPA encoder, heads at masked words with the row-chunked multi-label
  CE, fused AdamW (``torch.optim.AdamW(fused=True)``, as engine/train/optim.py builds it).
- ``masked_heads`` (baseline b) and ``plain`` (baseline a): benchmarks/baselines_torch.py, on batches in
  random order, padded; default AdamW.  ``plain`` computes [B*T, V] logits and targets, which at B = 256
  do not fit in memory comfortably, so it runs the step as micro-batches of 32 users with gradient
  accumulation (what its user would do); the optimizer still steps once per 256 users.

Batches are collated before timing (the loader's work runs in loader threads; its rate is measured in
test_loader.py).  Each round runs N steps over pre-built batches; users/s = N * B / median round time.
extra_info: users/s, real tokens/s, grid tokens/s, padding share of the grid.
Under ``--benchmark-disable`` (CI) each provider runs one step of 16 users on a small data set.
"""

from __future__ import annotations

import bench_data
import numpy as np
import pytest
import torch
from baselines_torch import PaddedBatch, PlainUserBERT, padded_from_batch

PROVIDERS = ["ours", "masked_heads", "plain"]
STEPS = {"ours": 8, "masked_heads": 3, "plain": 1}  # steps per timed round (full size)
PLAIN_MICRO = 32  # users per micro-batch of baseline (a)


@pytest.fixture(scope="module")
def setup(synth_tok, bench_full):
    from engine.config import VocabSpec, load_config
    from engine.data.collate import Collator
    from engine.model.userbert import user_attr_offsets
    from tokenizer.shards import open_tokenized

    data = open_tokenized(synth_tok)
    spec = VocabSpec.from_manifest(data.manifest)
    cfg = load_config(bench_data.PAPER_CONFIG)
    collator = Collator(data, user_attr_offsets(spec))
    return data, spec, cfg, collator


def _plan(collator, B: int, n: int, grouped: bool) -> list[np.ndarray]:
    from engine.data.loader import epoch_plan, sequence_lengths

    rows = np.arange(collator.data.num_users)
    lengths = sequence_lengths(collator, rows) if grouped else None
    plan = epoch_plan(len(rows), B, seed=0, epoch=0, lengths=lengths)
    return plan[:n]


def build_step(provider: str, spec, cfg, collator, B: int, n: int):
    """(step function over pre-built batches, batches, stats) for one provider."""
    from engine.model.userbert import UserBERT
    from engine.train.optim import build_optimizer

    torch.manual_seed(0)
    if provider == "ours":
        model = UserBERT(cfg.model, spec)
        opt = build_optimizer(model, 1e-4, (0.9, 0.999), 0.0, fused=True)
        batches = [collator(u, seed=i) for i, u in enumerate(_plan(collator, B, n, grouped=True))]

        def step(b):
            loss, _ = model.pretrain_loss(b, cfg.masking)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        real = [b.seq_lens.numpy() for b in batches]
        grid = sum(b.batch_size * b.max_len for b in batches)
    else:
        heads = "masked" if provider == "masked_heads" else "all"
        model = PlainUserBERT(cfg.model, spec, heads=heads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        micro = PLAIN_MICRO if provider == "plain" else B
        batches, real = [], []
        for i, users in enumerate(_plan(collator, B, n, grouped=False)):
            parts = [collator(users[j:j + micro], seed=i * 1000 + j) for j in range(0, len(users), micro)]
            batches.append([padded_from_batch(p) for p in parts])
            real.append(np.concatenate([p.seq_lens.numpy() for p in parts]))
        grid = sum(pb.tokens for mb in batches for pb in mb)

        def step(mb: list[PaddedBatch]):
            for pb in mb:
                loss = model.loss(pb, cfg.masking.normalize_labels) * (pb.batch_size / B)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    n_real = sum(int(r.sum()) for r in real)
    stats = {"users_per_step": B, "steps_per_round": len(batches), "real_tokens": n_real, "grid_tokens": grid,
             "grid_padding": 1.0 - n_real / grid, "parameters": sum(p.numel() for p in model.parameters())}
    return step, batches, stats


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step_cpu(benchmark, setup, bench_full, provider):
    import os

    data, spec, cfg, collator = setup
    B = 256 if bench_full else 16
    n = STEPS[provider] if bench_full else 1
    step, batches, stats = build_step(provider, spec, cfg, collator, B, n)
    step(batches[0])  # warm-up: allocator, lazy inits

    def run():
        for b in batches:
            loss = step(b)
        assert torch.isfinite(loss)

    benchmark.pedantic(run, rounds=2 if bench_full else 1, iterations=1)
    info = {"provider": provider, "device": "cpu", "threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()[0], **stats}
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        info.update(users_per_s=B * len(batches) / sec, tokens_per_s=stats["real_tokens"] / sec,
                    grid_tokens_per_s=stats["grid_tokens"] / sec, step_ms=sec / len(batches) * 1e3)
    benchmark.extra_info.update(info)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU step is also in gpu_check.py)")
def test_train_step_gpu_bf16(benchmark, setup, bench_full):
    data, spec, cfg, collator = setup
    from engine.model.userbert import UserBERT
    from engine.train.optim import build_optimizer

    dev = torch.device("cuda")
    B = 512 if bench_full else 16
    torch.manual_seed(0)
    model = UserBERT(cfg.model, spec).to(dev)
    opt = build_optimizer(model, 1e-4, (0.9, 0.999), 0.0, fused=True)
    batches = [collator(u, seed=i).to(dev) for i, u in enumerate(_plan(collator, B, 8 if bench_full else 1, True))]

    def run():
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = model.pretrain_loss(b, cfg.masking)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=3 if bench_full else 1, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info.update(users_per_s=B * len(batches) / benchmark.stats.stats.median)


def test_baselines_compute_our_loss(setup):
    """Honesty check: with our weights and no dropout, both baselines give our loss and gradients agree."""
    from engine.config import ModelConfig
    from engine.model.userbert import UserBERT

    data, spec, cfg, collator = setup
    mc = ModelConfig(**{**cfg.model.__dict__, "dropout": 0.0, "attn_dropout": 0.0})
    torch.manual_seed(1)
    ours = UserBERT(mc, spec)
    batch = collator(np.arange(12), seed=3)
    loss, _ = ours.pretrain_loss(batch, cfg.masking)
    loss.backward()
    pb = padded_from_batch(batch)
    for heads in ("masked", "all"):
        base = PlainUserBERT(mc, spec, heads=heads)
        base.copy_weights_from(ours)
        bl = base.loss(pb, cfg.masking.normalize_labels)
        assert float(bl.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
        bl.backward()
        for mine, theirs in ((base.heads[0][3].weight, ours.heads.heads[spec.segments[0].name][
                spec.segments[0].attributes[3]].weight), (base.encoder.layers[0].linear1.weight,
                                                         ours.encoder.blocks[0].mlp.fc.weight)):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7)
