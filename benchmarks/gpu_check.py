"""One-shot GPU check of the fused kernels: correctness at the paper's sizes, then timings.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--users 512]    # on a GPU, < 5 min
    python benchmarks/gpu_check.py --smoke                                # CPU, Triton interpreter, tiny

What it does, in order (each section's results go to the JSON; a short table is printed last):

1. Device-to-device copy bandwidth (1 GiB buffer): the ceiling for the memory-bound gather.
2. Synthetic inputs at the paper's sizes: 512 users, two behaviour segments (long-term: 6 attributes,
   dims summing to H = 128, shop vocabulary 85,124; short-term: 4 attributes), ~128 words per segment
   per user, Zipf-distributed ids, 15% of words masked (~19.5 per segment per user), 80% of those
   zeroed, labels = distinct values per masked word.
3. Correctness: both Triton kernels against the torch references (forward and every gradient), the
   gather's two backward variants, the cross entropy in fp32 (TF32 off) and under bf16 autocast.
4. Timings (forward + backward, CUDA events, median): gather_concat_mean (Triton atomic, Triton
   sorted, torch reference, nn.EmbeddingBag-per-attribute + cat) in GB/s against the copy bandwidth;
   multi_label_softmax_ce over all heads of a segment (Triton grouped, torch chunked reference, full
   logits + F.cross_entropy with probability targets) with peak memory; a V_CHUNK sweep.
5. A whole training step (engine.model.UserBERT, fused AdamW, clipping, bf16 autocast), kernel_impl
   triton vs torch, in users/s (issue 7's target: >= 20,000 users/s on one H100 at the paper config).
6. The loader's rate: collate (Numba) on one host core at the paper's cap of 128 + 128 words per user,
   in users/s per core (target >= 50,000); skipped with a note where numba or pyarrow is missing.

Targets (issue 4, on an H100): gather forward >= 70% of the copy bandwidth, backward >= 35%; fused
cross entropy >= 2x faster than the full-logits path at <= 10% of its peak memory.

Runs with torch + triton + numpy (no deepspeed import), on triton >= 3.2; section 6 also needs numba and
pyarrow.
``--smoke`` runs every section on CPU tensors in Triton's interpreter at tiny sizes: the
correctness path is then exercised in CI (tests/test_kernels_gpu_check.py); its timings mean nothing.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before triton is imported: the kernels are defined for the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the interpreter's tl.dot is numpy (see tests)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # runs from a bare checkout, without `pip install -e .`
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels.gather_concat_mean as gcm  # noqa: E402
import kernels.multi_label_ce as mlce  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


@dataclass
class SegmentLayout:
    name: str
    attributes: list[str]
    vocabs: list[int]  # per attribute, ids 0 (padding) and 1 (unknown) included
    dims: list[int]
    num_positions: int
    words_mean: float  # words per user (capped at max_words)
    max_words: int
    actions_mean: float  # actions per word (>= 1, capped at 32)


def paper_layout() -> tuple[list[SegmentLayout], list[int], int]:
    """(segments, user attribute vocabularies, H): Table 1 of the paper, dims summing to H = 128."""
    long = SegmentLayout("long", ["action", "channel", "expense", "shop", "genre", "hour"],
                         [10, 12, 14, 85124, 11438, 26], [8, 8, 8, 48, 40, 16], num_positions=400,
                         words_mean=130.0, max_words=128, actions_mean=2.5)
    short = SegmentLayout("short", ["action", "shop", "genre", "device"], [10, 40804, 10386, 8], [16, 64, 40, 8],
                          num_positions=200, words_mean=130.0, max_words=128, actions_mean=6.0)
    return [long, short], [4, 10, 50], 128


def smoke_layout() -> tuple[list[SegmentLayout], list[int], int]:
    long = SegmentLayout("long", ["action", "channel", "expense", "shop", "genre", "hour"],
                         [10, 12, 14, 301, 97, 26], [4, 4, 4, 8, 8, 4], num_positions=40,
                         words_mean=12.0, max_words=16, actions_mean=2.5)
    short = SegmentLayout("short", ["action", "shop", "genre", "device"], [10, 211, 89, 8], [8, 12, 8, 4],
                          num_positions=30, words_mean=12.0, max_words=16, actions_mean=4.0)
    return [long, short], [4, 10, 50], 32


# ------------------------------------------------------------------------------------------------
# Synthetic batch (numpy, vectorised; the layout of engine.batch.Batch / docs/FORMATS.md §5)
# ------------------------------------------------------------------------------------------------


def zipf_ids(rng: np.random.Generator, vocab: int, n: int, a: float = 1.2) -> np.ndarray:
    """Ids in [2, vocab) with a Zipf head at 2 (0 and 1 are reserved: padding, unknown)."""
    if vocab <= 2:
        return np.full(n, vocab - 1, dtype=np.int64)
    return 2 + (rng.zipf(a, n) - 1) % (vocab - 2)


def distinct_labels(word_of_action: np.ndarray, ids: np.ndarray, masked: np.ndarray, vocab: int):
    """Label CSR over the masked words: the distinct ids of each masked word's actions, ascending."""
    rank = np.full(int(word_of_action.max(initial=-1)) + 1, -1, dtype=np.int64)
    rank[masked] = np.arange(len(masked))
    r = rank[word_of_action] if len(word_of_action) else np.zeros(0, dtype=np.int64)
    keep = r >= 0
    keys = np.unique(r[keep] * vocab + ids[keep])
    rows, labels = keys // vocab, keys % vocab
    offsets = np.zeros(len(masked) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(masked)), out=offsets[1:])
    return offsets, labels


def synth_batch(layout: list[SegmentLayout], user_vocabs: list[int], n_users: int, seed: int,
                device: torch.device):
    """An engine.batch.Batch (tensors on ``device``) plus per-segment numpy extras for the checks."""
    from engine.data.batch import Batch, SegmentBatch

    rng = np.random.default_rng(seed)
    n_words = [np.minimum(rng.poisson(s.words_mean, n_users), s.max_words).astype(np.int64) for s in layout]
    U = len(user_vocabs)
    seq_lens = 1 + U + sum(n_words)
    T = int(seq_lens.max())
    segs = []
    for s, (sl, nw) in enumerate(zip(layout, n_words)):
        W = int(nw.sum())
        user_of_word = np.repeat(np.arange(n_users), nw)
        first_word = np.concatenate([[0], np.cumsum(nw)[:-1]])
        t_in_user = np.arange(W) - first_word[user_of_word]
        t0 = 1 + U + sum((n_words[r] for r in range(s)), np.zeros(n_users, dtype=np.int64))  # [B] segments follow
        # each other in the grid
        word_slot = user_of_word * T + t0[user_of_word] + t_in_user
        word_pos = rng.integers(0, sl.num_positions, W)  # order is irrelevant to the kernels
        n_act = np.minimum(rng.geometric(1.0 / sl.actions_mean, W), 32)  # >= 1, mean ~actions_mean
        offsets = np.concatenate([[0], np.cumsum(n_act)])
        A = int(offsets[-1])
        ids = np.stack([zipf_ids(rng, v, A) for v in sl.vocabs], axis=1)
        # each word masked with probability 0.15 (collate draws exactly 15% per user; the count is what
        # matters here), 80% of the masked words zeroed
        pick = rng.random(W) < 0.15
        masked = np.flatnonzero(pick)
        zero = rng.random(len(masked)) < 0.8
        word_of_action = np.repeat(np.arange(W), n_act)
        lab = [distinct_labels(word_of_action, ids[:, k], masked, v) for k, v in enumerate(sl.vocabs)]
        i32 = dict(dtype=torch.int32, device=device)
        segs.append(SegmentBatch(
            attr_ids=torch.tensor(ids, **i32), word_offsets=torch.tensor(offsets, **i32),
            word_pos=torch.tensor(word_pos, **i32), word_slot=torch.tensor(word_slot, dtype=torch.int64, device=device),
            masked=torch.tensor(masked, dtype=torch.int64, device=device),
            masked_zero=torch.tensor(zero, dtype=torch.bool, device=device),
            label_offsets=[torch.tensor(o, **i32) for o, _ in lab],
            label_ids=[torch.tensor(i, **i32) for _, i in lab],
        ))
    offs = np.concatenate([[0], np.cumsum(user_vocabs)[:-1]])
    ua = np.stack([offs[j] + rng.integers(2, v, n_users) for j, v in enumerate(user_vocabs)], axis=1)
    return Batch(segments=segs, user_attr_ids=torch.tensor(ua, dtype=torch.int32, device=device),
                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), max_len=T,
                 users=torch.arange(n_users, device=device))


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, reps: int, warmup: int) -> dict:
    """Median and min milliseconds of ``fn()`` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": float(np.median(times)), "ms_min": float(np.min(times)), "reps": reps}


def peak_mb(fn, device: torch.device) -> float | None:
    """Peak memory allocated above the baseline while ``fn()`` runs (GPU only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def copy_bandwidth(device: torch.device, smoke: bool) -> dict:
    n = (1 << 20) if smoke else (1 << 28)  # 4 MiB / 1 GiB of fp32
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), device, reps=3 if smoke else 20, warmup=1 if smoke else 3)
    gbs = 2 * x.numel() * 4 / (t["ms"] * 1e-3) / 1e9  # read + write
    return {"bytes": 2 * x.numel() * 4, **t, "GB_per_s": gbs}


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------


def gcm_user_baseline(tables, attr_ids, word_offsets, zero_mask, pos_table, word_pos, seg_vec):
    """What a user would write: one nn.EmbeddingBag(mode="mean", padding_idx=0) per attribute, cat,
    then zeroing and the position/segment add as separate ops.  (padding_idx excludes id 0 from the
    mean's denominator, unlike our convention; the synthetic ids never contain 0.)"""
    offs = word_offsets.long()
    outs = [F.embedding_bag(attr_ids[:, k].long(), t, offs, mode="mean", include_last_offset=True, padding_idx=0)
            for k, t in enumerate(tables)]
    out = torch.cat(outs, dim=1).masked_fill(zero_mask[:, None], 0.0)
    return out + F.embedding(word_pos.long(), pos_table) + seg_vec


def ce_full_logits(hidden, weights, biases, label_offsets, label_ids, normalize=True):
    """What a user would write: full [M, V] logits per head and F.cross_entropy with probability
    targets y/|y| (a dense multi-hot target), per-row losses [n_heads, M]."""
    out = []
    M = hidden.shape[0]
    for w, b, offs, ids in zip(weights, biases, label_offsets, label_ids):
        counts = (offs[1:] - offs[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(M, device=hidden.device), counts, output_size=ids.shape[0])
        target = torch.zeros(M, w.shape[0], device=hidden.device)
        target.index_put_((rows, ids.long()), torch.ones_like(rows, dtype=torch.float32), accumulate=True)
        if normalize:
            target = target / counts.clamp(min=1)[:, None]
            loss = F.cross_entropy(F.linear(hidden, w, b).float(), target, reduction="none")
        else:
            logits = F.linear(hidden, w, b).float()
            loss = (target * (torch.logsumexp(logits, 1, keepdim=True) - logits)).sum(1)
        out.append(torch.where(counts > 0, loss, torch.zeros_like(loss)))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, 1e-30): one number per tensor, scale-free."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def gcm_inputs(seg, sl: SegmentLayout, H: int, device, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tables = [(torch.randn(v, d, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
              for v, d in zip(sl.vocabs, sl.dims)]
    pos = (torch.randn(sl.num_positions, H, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
    segv = (torch.randn(H, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_()
    zero = torch.zeros(seg.n_words, dtype=torch.bool, device=device).index_put_((seg.masked,), seg.masked_zero)
    return tables, pos, segv, zero


def check_gather(seg, sl, H, device) -> dict:
    tables, pos, segv, zero = gcm_inputs(seg, sl, H, device)
    kw = dict(zero_mask=zero, pos_table=pos, word_pos=seg.word_pos, seg_vec=segv)
    params = [*tables, pos, segv]
    ref = gcm.gather_concat_mean(tables, seg.attr_ids, seg.word_offsets, impl="torch", **kw)
    g_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g_out)
    res = {}
    for variant in gcm.BACKWARD_VARIANTS:
        out = gcm.gather_concat_mean(tables, seg.attr_ids, seg.word_offsets, impl="triton", backward=variant, **kw)
        grads = torch.autograd.grad(out, params, g_out)
        errs = {"forward": rel_err(out, ref)}
        errs.update({f"grad[{k}]": rel_err(a, b) for k, (a, b) in enumerate(zip(grads, ref_grads))})
        worst = max(errs.values())
        res[variant] = {"max_rel_err": worst, "errors": errs, "ok": worst <= 1e-5}
    return res


def ce_inputs(seg, sl, H, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    M = seg.masked.shape[0]
    hidden = torch.randn(M, H, generator=g).to(device).requires_grad_()
    weights = [(torch.randn(v, H, generator=g) / H ** 0.5).to(device).requires_grad_() for v in sl.vocabs]
    biases = [(torch.randn(v, generator=g) * 0.1).to(device).requires_grad_() for v in sl.vocabs]
    return hidden, weights, biases


def check_ce(seg, sl, H, device) -> dict:
    hidden, weights, biases = ce_inputs(seg, sl, H, device)
    params = [hidden, *weights, *biases]
    args = (seg.label_offsets, seg.label_ids)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for this check
    try:
        ref = mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl="torch")
        g = torch.rand_like(ref) + 0.5
        ref_grads = torch.autograd.grad(ref, params, g)
        out = mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl="triton")
        grads = torch.autograd.grad(out, params, g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    names = ["loss", "grad hidden", *[f"grad weight[{k}]" for k in range(len(weights))],
             *[f"grad bias[{k}]" for k in range(len(biases))]]
    errs = dict(zip(names, [rel_err(out, ref), *[rel_err(a, b) for a, b in zip(grads, ref_grads)]]))
    res = {"fp32": {"max_rel_err": max(errs.values()), "errors": errs, "ok": max(errs.values()) <= 1e-4}}
    # bf16 autocast (production): operands rounded to bf16, fp32 accumulation; against the fp32 reference.
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl="triton")
    grads = torch.autograd.grad(out, params, g)
    errs = dict(zip(names, [rel_err(out, ref), *[rel_err(a, b) for a, b in zip(grads, ref_grads)]]))
    res["bf16_autocast"] = {"max_rel_err": max(errs.values()), "errors": errs, "ok": max(errs.values()) <= 3e-2}
    return res


# ------------------------------------------------------------------------------------------------
# Timings
# ------------------------------------------------------------------------------------------------


def gather_bytes(seg, sl: SegmentLayout, zero: torch.Tensor, es: int) -> tuple[int, int]:
    """The bytes a perfect gather_concat_mean must move (docs/KERNELS.md), forward and backward.

    Forward: ids + offsets + the gathered rows of the words that are not zeroed + position ids and
    rows + output.  Backward: grad_out + ids + offsets + an fp32 read-modify-write per gathered
    element + zeroing the fp32 table gradients + casting them to the table dtype when it is not fp32.
    ``es``: the tables' element size.
    """
    n_words, n_actions, K, D = seg.n_words, seg.attr_ids.shape[0], len(sl.dims), sum(sl.dims)
    live_actions = int((seg.word_offsets[1:] - seg.word_offsets[:-1])[~zero].sum())
    table_elems = sum(v * d for v, d in zip(sl.vocabs, sl.dims))
    fwd = n_actions * K * 4 + (n_words + 1) * 4 + live_actions * D * es + n_words * (4 + D * es) + n_words * D * es
    bwd = (n_words * D * es + n_actions * K * 4 + (n_words + 1) * 4 + live_actions * D * 8 + table_elems * 4
           + (table_elems * (4 + es) if es != 4 else 0))
    return fwd, bwd


def time_gather(seg, sl, H, device, copy_gbs, reps, warmup, dtype, only: tuple[str, ...] | None = None) -> dict:
    tables, pos, segv, zero = gcm_inputs(seg, sl, H, device, dtype=dtype)
    kw = dict(zero_mask=zero, pos_table=pos, word_pos=seg.word_pos, seg_vec=segv)
    params = [*tables, pos, segv]
    n_words, n_actions, D = seg.n_words, seg.attr_ids.shape[0], sum(sl.dims)
    fwd_bytes, bwd_bytes = gather_bytes(seg, sl, zero, tables[0].element_size())
    out = {"n_words": n_words, "n_actions": n_actions, "D": D, "dtype": str(dtype).replace("torch.", ""),
           "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes}
    g_out = None

    def providers():
        yield "triton_atomic", lambda: gcm.gather_concat_mean(tables, seg.attr_ids, seg.word_offsets, impl="triton",
                                                               backward="atomic", **kw)
        yield "triton_sorted", lambda: gcm.gather_concat_mean(tables, seg.attr_ids, seg.word_offsets, impl="triton",
                                                               backward="sorted", **kw)
        yield "torch", lambda: gcm.gather_concat_mean(tables, seg.attr_ids, seg.word_offsets, impl="torch", **kw)
        yield "embedding_bag_cat", lambda: gcm_user_baseline(tables, seg.attr_ids, seg.word_offsets, zero,
                                                             pos, seg.word_pos, segv)

    for name, f in providers():
        if only is not None and name not in only:
            continue
        with torch.no_grad():
            t_fwd = bench(f, device, reps, warmup)
        y = f()
        if g_out is None:
            g_out = torch.randn_like(y)
        t_bwd = bench(lambda y=y, g=g_out: torch.autograd.grad(y, params, g, retain_graph=True), device, reps, warmup)
        t_both = bench(lambda f=f, g=g_out: torch.autograd.grad(f(), params, g), device, reps, warmup)
        out[name] = {"fwd": t_fwd, "bwd": t_bwd, "fwd_bwd": t_both,
                     "fwd_GB_per_s": fwd_bytes / (t_fwd["ms"] * 1e-3) / 1e9,
                     "bwd_GB_per_s": bwd_bytes / (t_bwd["ms"] * 1e-3) / 1e9}
        if copy_gbs:
            out[name]["fwd_vs_copy"] = out[name]["fwd_GB_per_s"] / copy_gbs
            out[name]["bwd_vs_copy"] = out[name]["bwd_GB_per_s"] / copy_gbs
        del y
    return out


def time_ce(seg, sl, H, device, reps, warmup, autocast: bool, only: tuple[str, ...] | None = None) -> dict:
    hidden, weights, biases = ce_inputs(seg, sl, H, device, seed=1)
    params = [hidden, *weights, *biases]
    args = (seg.label_offsets, seg.label_ids)
    M, V = hidden.shape[0], sum(sl.vocabs)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else torch.enable_grad

    def run(loss_fn):
        def step():
            with ctx():
                loss = loss_fn()
            torch.autograd.grad(loss.sum(), params)
        return step

    providers = {
        "triton": run(lambda: mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl="triton")),
        "torch": run(lambda: mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl="torch")),
        "full_logits": run(lambda: ce_full_logits(hidden, weights, biases, *args)),
    }
    out = {"M": M, "V_total": V, "H": H, "autocast_bf16": autocast,
           "model_gflop": 8 * M * H * V / 1e9, "kernel_gflop": 10 * M * H * V / 1e9}
    for name, fn in providers.items():
        if only is not None and name not in only:
            continue
        t = bench(fn, device, reps, warmup)
        out[name] = {"fwd_bwd": t, "peak_MB": peak_mb(fn, device),
                     "model_TFLOP_per_s": out["model_gflop"] / (t["ms"] * 1e-3) / 1e3}
    if "triton" not in out or "full_logits" not in out:
        return out
    base = out["full_logits"]
    out["speedup_vs_full_logits"] = base["fwd_bwd"]["ms"] / out["triton"]["fwd_bwd"]["ms"]
    if base["peak_MB"]:
        out["memory_vs_full_logits"] = out["triton"]["peak_MB"] / base["peak_MB"]
    # V_CHUNK sweep (a schedule choice, no recompilation): balance of work items vs dHidden atomics
    sweep = {}
    for chunk in ((64, 128) if device.type != "cuda" else (2048, 4096, 8192, 16384)):
        mlce.CONFIG["v_chunk"] = chunk
        try:
            sweep[str(chunk)] = bench(providers["triton"], device, reps, warmup)["ms"]
        finally:
            mlce.CONFIG["v_chunk"] = None
    out["triton_v_chunk_sweep_ms"] = sweep
    return out


def paper_model(layout, user_vocabs, H, impl: str, device):
    """engine.model.UserBERT at the paper's configuration (L=4, A=4) over ``layout``."""
    from engine.config import ModelConfig, SegmentVocab, VocabSpec
    from engine.model.userbert import UserBERT

    spec = VocabSpec([SegmentVocab(s.name, s.attributes, s.vocabs, s.dims, s.num_positions, s.max_words)
                      for s in layout], [f"u{j}" for j in range(len(user_vocabs))], list(user_vocabs))
    cfg = ModelConfig(hidden=H, layers=4, heads=4, dropout=0.1, attn_dropout=0.1, kernel_impl=impl)
    return UserBERT(cfg, spec).to(device)


def train_step_launches(layout, user_vocabs, H, batch, device) -> None:
    """One forward + backward of time_train_step's step (bf16 autocast), no optimiser: the kernel
    launches of a training step, for benchmarks/compile_gate.py (which runs it on meta tensors)."""
    from engine.config import MaskingConfig

    model = paper_model(layout, user_vocabs, H, "triton", device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = model.pretrain_loss(batch, MaskingConfig())
    loss.backward()


def time_train_step(layout, user_vocabs, H, batch, device, reps, warmup) -> dict:
    from engine.config import MaskingConfig

    out = {"users": batch.batch_size, "tokens": int(batch.seq_lens.sum()), "T": batch.max_len}
    masking = MaskingConfig()

    def one(impl: str) -> dict:
        torch.manual_seed(0)
        model = paper_model(layout, user_vocabs, H, impl, device)
        # as the training loop (engine/train/): fused AdamW, clipping at 1.0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        losses = []

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, stats = model.pretrain_loss(batch, masking)  # stats: one device->host copy per step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        t = bench(step, device, reps, warmup)
        return {"step": t, "users_per_s": batch.batch_size / (t["ms"] * 1e-3), "peak_MB": peak_mb(step, device),
                "first_loss": losses[0]}

    for impl in ("triton", "torch"):
        out[impl] = one(impl)
    out["speedup"] = out["torch"]["step"]["ms"] / out["triton"]["step"]["ms"]
    out["target_users_per_s"] = 20_000  # issue 7: one H100, bf16, paper configuration
    out["target_met"] = out["triton"]["users_per_s"] >= out["target_users_per_s"]
    return out


def loader_rate(smoke: bool, device: torch.device) -> dict:
    """engine.collate.Collator on one core (one torch thread), batches of 256 users at the paper's cap
    (128 long-term + 128 short-term words per user, benchmarks/bench_data.py): users/s per host core
    (target >= 50,000); then engine.data.TrainLoader as the trainer runs it on this host (its automatic
    number of collate threads, pinned buffers, one copy to ``device`` per batch): users/s delivered.
    Needs numba and pyarrow; skipped with a note where they are missing."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_data

        from engine.config import VocabSpec
        from engine.data.collate import Collator
        from engine.model.userbert import user_attr_offsets
    except ImportError as e:
        return {"skipped": f"{type(e).__name__}: {e}"}
    n_users, B, n_batches = (64, 16, 2) if smoke else (4096, 256, 40)
    data = bench_data.paper_length_data(n_users)
    collator = Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest)))
    rng = np.random.default_rng(0)
    plan = [rng.choice(n_users, B, replace=False) for _ in range(n_batches)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collator.packed(plan[0], 0)  # a loader thread's whole work per batch: the buffer it hands over
        t = time.perf_counter()
        for i, users in enumerate(plan):
            collator.packed(users, i)
        sec = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    out = {"users": B * n_batches, "seconds": sec, "users_per_s_per_core": B * n_batches / sec,
           "target_users_per_s_per_core": 50_000, "cpus": os.cpu_count()}

    from engine.data.loader import TrainBatches, TrainLoader, auto_workers, batch_layout

    workers = max(1, auto_workers(-1, torch.device("cuda")))  # what the trainer picks on a GPU host (>= 1 here)
    steps = n_batches + 4
    loader = TrainLoader(TrainBatches(collator, batch_layout(B, 1), 0, 0, 0, steps), workers,
                         pin_memory=device.type == "cuda", device=device)
    it = iter(loader)
    try:
        for _ in range(4):  # threads started, first batches out
            next(it)
        sync(device)
        t = time.perf_counter()
        n = sum(next(it).batch_size for _ in range(n_batches))
        sync(device)
        sec = time.perf_counter() - t
    finally:
        loader.close()
    out["train_loader"] = {"threads": workers, "device": str(device), "users": n, "seconds": sec,
                           "users_per_s": n / sec}
    return out


def check_packed_transport(device: torch.device) -> dict:
    """What a loader thread hands over (Collator.packed): the buffer moved to ``device`` in one copy and
    unpacked there must equal the Batch moved tensor by tensor, and the one copy is timed against the many."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_data

    from engine.config import VocabSpec
    from engine.data.batch import PackedBatch, flat_tensors, unpack_batch
    from engine.data.collate import Collator
    from engine.model.userbert import user_attr_offsets

    data = bench_data.paper_length_data(64)
    packed = Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest))).packed(np.arange(64), seed=1)
    batch = unpack_batch(packed)
    pinned = PackedBatch(packed.buffer.pin_memory(), packed.spec) if device.type == "cuda" else packed

    def one_copy():
        return unpack_batch(PackedBatch(pinned.buffer.to(device, non_blocking=True), pinned.spec))

    many = batch.pin_memory() if device.type == "cuda" else batch

    def per_tensor():
        return many.to(device, non_blocking=True)

    a, b = flat_tensors(one_copy()), flat_tensors(per_tensor())
    ok = len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
    return {"ok": ok, "tensors": len(a), "bytes": int(packed.buffer.numel()),
            "one_copy_ms": _time_ms(one_copy, device), "per_tensor_ms": _time_ms(per_tensor, device)}


def _time_ms(fn, device: torch.device, reps: int = 20) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [f"{'what':44s} {'ms':>9s} {'GB/s | TFLOP/s':>16s} {'peak MB':>9s}  note"]
    copy = results.get("copy")
    if copy:
        lines.append(f"{'device-to-device copy':44s} {copy['ms']:9.3f} {copy['GB_per_s']:16.1f} {'':>9s}")
    for seg_name, r in results.get("gather", {}).items():
        for p in ("triton_atomic", "triton_sorted", "torch", "embedding_bag_cat"):
            if p in r:
                q = r[p]
                note = (f"fwd {q.get('fwd_vs_copy', 0):.0%} / bwd {q.get('bwd_vs_copy', 0):.0%} of copy"
                        if "fwd_vs_copy" in q else "")
                lines.append(f"{'gather ' + seg_name + ' ' + p + ' fwd':44s} {q['fwd']['ms']:9.3f} "
                             f"{q['fwd_GB_per_s']:16.1f} {'':>9s}  {note}")
                lines.append(f"{'gather ' + seg_name + ' ' + p + ' bwd':44s} {q['bwd']['ms']:9.3f} "
                             f"{q['bwd_GB_per_s']:16.1f} {'':>9s}")
    for seg_name, r in results.get("ce", {}).items():
        for p in ("triton", "torch", "full_logits"):
            if p not in r:
                continue
            q = r[p]
            peak = f"{q['peak_MB']:9.0f}" if q["peak_MB"] is not None else f"{'-':>9s}"
            note = (f"{r['speedup_vs_full_logits']:.2f}x faster, {r.get('memory_vs_full_logits', float('nan')):.1%} "
                    "memory vs full logits" if p == "triton" and "speedup_vs_full_logits" in r else "")
            lines.append(f"{'ce ' + seg_name + ' ' + p + ' fwd+bwd':44s} {q['fwd_bwd']['ms']:9.3f} "
                         f"{q['model_TFLOP_per_s']:16.2f} {peak}  {note}")
    step = results.get("train_step")
    if step:
        for p in ("triton", "torch"):
            q = step[p]
            peak = f"{q['peak_MB']:9.0f}" if q["peak_MB"] is not None else f"{'-':>9s}"
            what = f"train step {p} ({step['users']} users)"
            lines.append(f"{what:44s} {q['step']['ms']:9.1f} {'':>16s} {peak}  {q['users_per_s']:.0f} users/s")
    loader = results.get("loader")
    if loader and "users_per_s_per_core" in loader:
        what = "loader: collate, paper-max lengths, 1 core"
        lines.append(f"{what:44s} {loader['seconds'] * 1e3:9.1f} {'':>16s} {'':>9s}  "
                     f"{loader['users_per_s_per_core']:.0f} users/s per core (target 50,000)")
    elif loader:
        lines.append(f"{'loader':44s} skipped: {loader.get('skipped')}")
    if "checks_ok" not in results:
        return "\n".join(lines)
    checks = results.get("checks_ok")
    lines.append(f"correctness: {'all checks passed' if checks else 'FAILED: ' + ', '.join(results.get('failed', []))}")
    return "\n".join(lines)


def cpu_reference(args) -> int:
    """The CPU production path (the torch references) and the user's baselines at the paper's
    vocabularies and H, fp32, on however many users a CPU handles: numbers for docs/bench/kernels.md."""
    device = torch.device("cpu")
    layout, user_vocabs, H = paper_layout()
    n_users, reps = args.users or 16, args.reps or 5
    batch = synth_batch(layout, user_vocabs, n_users, seed=0, device=device)
    res: dict = {"mode": "cpu_reference", "users": n_users, "H": H, "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "loadavg": os.getloadavg(), "gather": {}, "ce": {}}
    for sl, sb in zip(layout, batch.segments):
        res["gather"][sl.name] = time_gather(sb, sl, H, device, None, reps, 1, torch.float32,
                                             only=("torch", "embedding_bag_cat"))
        res["ce"][sl.name] = time_ce(sb, sl, H, device, reps, 1, autocast=False, only=("torch", "full_logits"))
    out = args.out or "gpu_check_cpu_reference.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(table(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 (CI)")
    ap.add_argument("--out", default=None, help="JSON output (default: gpu_check.json, or gpu_check_smoke.json)")
    ap.add_argument("--users", type=int, default=None, help="users per batch (default 512; smoke 4)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; smoke 1)")
    ap.add_argument("--skip-step", action="store_true", help="skip the whole-training-step timing")
    ap.add_argument("--cpu-reference", action="store_true",
                    help="time only the torch providers at the paper's vocabularies on CPU (default 16 users)")
    args = ap.parse_args(argv)
    if args.cpu_reference:
        return cpu_reference(args)

    t_start = time.perf_counter()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke for the CPU/interpreter correctness path", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(1)  # tiny tensors; a shared 2-core CI machine
    layout, user_vocabs, H = smoke_layout() if smoke else paper_layout()
    n_users = args.users or (4 if smoke else 512)
    reps, warmup = (args.reps or 1, 0) if smoke else (args.reps or 10, 3)

    import triton

    results: dict = {
        "smoke": smoke, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "users": n_users, "H": H, "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    failed: list[str] = []

    def section(name, fn):
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # record and go on: one failing section must not hide the others
            failed.append(f"{name}: {type(e).__name__}: {e}")
            import traceback

            traceback.print_exc()
            return None
        finally:
            print(f"[gpu_check] {name}: {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)

    results["copy"] = section("copy bandwidth", lambda: copy_bandwidth(device, smoke)) or {}
    batch = synth_batch(layout, user_vocabs, n_users, seed=0, device=device)
    results["inputs"] = {sl.name: {"words": sb.n_words, "actions": int(sb.attr_ids.shape[0]),
                                   "masked": int(sb.masked.shape[0]),
                                   "labels_per_head": [int(i.shape[0]) for i in sb.label_ids]}
                         for sl, sb in zip(layout, batch.segments)}

    checks: dict = {}
    for sl, sb in zip(layout, batch.segments):
        checks[f"gather_{sl.name}"] = section(f"check gather {sl.name}", lambda sl=sl, sb=sb: check_gather(sb, sl, H,
                                                                                                          device))
        checks[f"ce_{sl.name}"] = section(f"check ce {sl.name}", lambda sl=sl, sb=sb: check_ce(sb, sl, H, device))
    results["checks"] = checks
    for name, c in checks.items():
        if c is None:
            continue
        for variant, r in c.items():
            if not r["ok"]:
                failed.append(f"{name}/{variant}: max relative error {r['max_rel_err']:.3g}")

    copy_gbs = results["copy"].get("GB_per_s")
    results["gather"], results["ce"] = {}, {}
    for sl, sb in zip(layout, batch.segments):
        dtype = torch.float32 if smoke else torch.bfloat16
        r = section(f"time gather {sl.name}", lambda sl=sl, sb=sb, dt=dtype: time_gather(sb, sl, H, device, copy_gbs,
                                                                                          reps, warmup, dt))
        if r:
            results["gather"][sl.name] = r
        r = section(f"time ce {sl.name}", lambda sl=sl, sb=sb: time_ce(sb, sl, H, device, reps, warmup,
                                                                        autocast=not smoke))
        if r:
            results["ce"][sl.name] = r
    if not args.skip_step:
        results["train_step"] = section("time train step", lambda: time_train_step(layout, user_vocabs, H, batch,
                                                                                   device, reps, warmup))
    results["loader"] = section("loader rate", lambda: loader_rate(smoke, device))
    results["transport"] = section("packed batch transport", lambda: check_packed_transport(device))
    if results["transport"] is not None and not results["transport"]["ok"]:
        failed.append("transport: the unpacked batch differs from the batch moved tensor by tensor")
    results["checks_ok"] = not failed
    results["failed"] = failed
    results["seconds"] = time.perf_counter() - t_start
    out = args.out or ("gpu_check_smoke.json" if smoke else "gpu_check.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"[gpu_check] wrote {out} in {results['seconds']:.0f}s", file=sys.stderr)
    print(table(results))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
