"""Packing vs length grouping: padding waste on real length distributions, and the encoder's cost.

    pytest benchmarks/test_packing.py --benchmark-only

- ``test_padding_waste``: one epoch's batch plans (engine/data/loader.py) on the synthetic data and on
  Complete Journey, random vs length-grouped, B = 32 and 256: the share of grid tokens that are padding
  and the share of attention scores (T^2 per row) that are padding.  Also the same for packing (several
  users per row, first-fit decreasing into rows as long as the batch's longest user): token waste, and
  attention work relative to the grouped layout (a dense block-diagonal mask still computes C^2 scores
  per row on CPU SDPA).
- ``test_encoder_layout``: the paper encoder (L=4, H=128, A=4), forward + backward, on the same users
  laid out (i) padded and length-grouped with a key-padding bias, (ii) packed with a block-diagonal
  additive mask through SDPA.  users/s in extra_info: this is the measurement that decides packing.
"""

from __future__ import annotations

import os

import bench_data
import numpy as np
import pytest
import torch


def _lengths(tok) -> np.ndarray:
    from tokenizer.shards import open_tokenized

    data = open_tokenized(tok)
    U = data.user_attr_ids.shape[1]
    return 1 + U + sum(np.diff(s.user_word_offsets) for s in data.segments)


def pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` grouped into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(capacity - n)
    return rows


@pytest.fixture(scope="module")
def length_sets(synth_tok, tmp_path_factory):
    return {"synth": _lengths(synth_tok),
            "completejourney": _lengths(bench_data.completejourney_tokenized(
                bench_data.bench_cache_dir(tmp_path_factory)))}


@pytest.mark.parametrize("B", [32, 256])
@pytest.mark.parametrize("dataset", ["synth", "completejourney"])
def test_padding_waste(benchmark, length_sets, dataset, B):
    from engine.data.loader import epoch_plan

    lengths = length_sets[dataset]
    n = len(lengths)
    if n < B:
        pytest.skip(f"{n} users cannot fill a batch of {B}")
    res = {}

    def run():
        for name, grouped in (("random", False), ("grouped", True)):
            plan = epoch_plan(n, B, seed=0, epoch=0, lengths=lengths if grouped else None)
            res[name] = [lengths[b] for b in plan]

    benchmark.pedantic(run, rounds=1, iterations=1)
    info = {"dataset": dataset, "B": B, "users": n, "mean_len": float(lengths.mean()),
            "p90_len": float(np.percentile(lengths, 90)), "max_len": int(lengths.max())}
    for name, seqs in res.items():
        info[f"{name}_token_waste"], info[f"{name}_attention_waste"] = bench_data.padding_waste(seqs)
    # Packing the grouped batches' users (and the random ones': packing does not need grouping).
    packed_tokens = packed_scores = grouped_scores = real = 0
    for seq in res["random"]:
        C = int(seq.max())
        rows = pack_rows(seq, C)
        packed_tokens += len(rows) * C
        packed_scores += len(rows) * C * C
        real += int(seq.sum())
    for seq in res["grouped"]:
        grouped_scores += len(seq) * int(seq.max()) ** 2
    info["packed_token_waste"] = 1.0 - real / packed_tokens
    info["packed_attention_vs_grouped"] = packed_scores / grouped_scores
    benchmark.extra_info.update(info)
    assert 0.0 <= info["grouped_token_waste"] <= info["random_token_waste"] < 1.0


def _encoder_inputs(lengths: np.ndarray, H: int, packed: bool, seed: int = 0):
    """(x [R, C, H], additive mask [R, 1, C, C] or [R, 1, 1, C], where: (row, first token) of every user).

    Both layouts hold the same token vectors for the same seed, so they compute the same thing."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(int(n), H, generator=g) for n in lengths]
    if not packed:
        T = int(lengths.max())
        x = torch.zeros(len(lengths), T, H)
        for u, t in enumerate(tokens):
            x[u, :len(t)] = t
        real = torch.arange(T)[None, :] < torch.as_tensor(lengths)[:, None]
        bias = torch.zeros(len(lengths), 1, 1, T).masked_fill(~real[:, None, None, :], float("-inf"))
        return x, bias, [(u, 0) for u in range(len(lengths))]
    C = int(lengths.max())
    rows = pack_rows(lengths, C)
    x = torch.zeros(len(rows), C, H)
    seg = torch.full((len(rows), C), -1, dtype=torch.long)  # user id of each token, -1 = padding
    where = [(0, 0)] * len(lengths)
    for r, users in enumerate(rows):
        t = 0
        for u in users:
            n = int(lengths[u])
            x[r, t:t + n], seg[r, t:t + n], where[u] = tokens[u], u, (r, t)
            t += n
    same = seg[:, :, None] == seg[:, None, :]  # [R, C, C] block diagonal (padding attends to padding)
    bias = torch.zeros(len(rows), 1, C, C).masked_fill(~same[:, None], float("-inf"))
    return x, bias, where


def test_packed_and_padded_layouts_give_the_same_outputs():
    """The two layouts timed below compute the same thing: every user's encoder outputs agree."""
    from engine.config import ModelConfig
    from engine.model.encoder import Encoder

    lengths = np.random.default_rng(1).integers(1, 40, 23)
    cfg = ModelConfig(hidden=32, layers=2, heads=4, dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    outs = []
    for packed in (False, True):
        x, bias, where = _encoder_inputs(lengths, cfg.hidden, packed, seed=5)
        y = x
        for block in enc.blocks:
            y = block(y, bias)
        outs.append([y[r, t:t + int(n)] for (r, t), n in zip(where, lengths)])
    assert len(pack_rows(lengths, int(lengths.max()))) < len(lengths)  # some rows really hold several users
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["grouped_padded", "packed_block_diagonal"])
def test_encoder_layout(benchmark, length_sets, bench_full, layout):
    from engine.config import ModelConfig
    from engine.data.loader import epoch_plan
    from engine.model.encoder import Encoder

    lengths = length_sets["synth"]
    B = 256 if bench_full else 16
    plan = epoch_plan(len(lengths), B, seed=0, epoch=0, lengths=lengths)[:6 if bench_full else 1]
    cfg = ModelConfig(dropout=0.0, attn_dropout=0.0)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    inputs = [_encoder_inputs(lengths[b], cfg.hidden, layout.startswith("packed")) for b in plan]

    def run():
        for x, bias, _ in inputs:
            y = x
            for block in enc.blocks:
                y = block(y, bias)
            enc.norm(y).sum().backward()

    run()
    benchmark.pedantic(run, rounds=3 if bench_full else 1, iterations=1)
    grid = sum(x.shape[0] * x.shape[1] for x, _, _ in inputs)
    info = {"layout": layout, "B": B, "batches": len(plan), "grid_tokens": grid,
            "real_tokens": int(sum(lengths[b].sum() for b in plan)), "loadavg": os.getloadavg()[0]}
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        info.update(users_per_s=B * len(plan) / sec, tokens_per_s=info["real_tokens"] / sec)
    benchmark.extra_info.update(info)
