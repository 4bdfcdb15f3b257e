"""The fused kernels against the torch references and what a user would write, at the paper's sizes.

    pytest benchmarks/test_kernels.py --benchmark-only

Needs CUDA, and Triton compiling for it (the root conftest.py turns Triton's interpreter on only on
machines without CUDA, or when TRITON_INTERPRET=1 is set).  Skipped otherwise (CPU machines, CI).

Providers, per op (forward + backward, one segment of a 512-user batch; inputs from gpu_check.py):
- gather_concat_mean: ``triton_atomic``, ``triton_sorted`` (the two Triton backwards), ``torch`` (the
  reference / CPU path), ``embedding_bag_cat`` (one F.embedding_bag per attribute, torch.cat, then the
  zeroing and position + segment adds as separate ops).
- multi_label_softmax_ce, all heads of the segment, bf16 autocast: ``triton`` (grouped, one launch per
  pass), ``torch`` (row-chunked reference), ``full_logits`` (F.linear + F.cross_entropy with
  probability targets per head).
extra_info: GB/s against the bytes a perfect kernel moves (gather) or model TFLOP/s (cross entropy),
and the peak memory above the inputs.  benchmarks/gpu_check.py is the one-shot script with the same
providers, correctness checks and a whole training step.
"""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import interpreter_enabled, triton_importable

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_importable() and not interpreter_enabled()),
    reason="needs CUDA and triton compiling for it (not Triton's CPU interpreter, TRITON_INTERPRET=1)",
)

SEGMENTS = ["long", "short"]


@pytest.fixture(scope="module")
def paper_batch():
    import gpu_check  # benchmarks/ is on sys.path for its own test files (no __init__.py)

    layout, user_vocabs, H = gpu_check.paper_layout()
    batch = gpu_check.synth_batch(layout, user_vocabs, 512, seed=0, device=torch.device("cuda"))
    return gpu_check, {sl.name: (sl, sb) for sl, sb in zip(layout, batch.segments)}, H


def _run(benchmark, fn, extra: dict) -> None:
    def timed():
        fn()
        torch.cuda.synchronize()

    timed()  # compile / warm the caches outside the measurement
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    timed()
    extra["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        benchmark.extra_info.update(extra)
        return
    seconds = benchmark.stats.stats.median
    if "bytes" in extra:
        extra["GB_per_s"] = extra["bytes"] / seconds / 1e9
    if "model_gflop" in extra:
        extra["model_TFLOP_per_s"] = extra["model_gflop"] / seconds / 1e3
    benchmark.extra_info.update(extra)


@pytest.mark.parametrize("provider", ["triton_atomic", "triton_sorted", "torch", "embedding_bag_cat"])
@pytest.mark.parametrize("segment", SEGMENTS)
def test_gather_concat_mean_fwd_bwd(benchmark, paper_batch, provider, segment):
    import kernels.gather_concat_mean as gcm

    gpu_check, segs, H = paper_batch
    sl, sb = segs[segment]
    tables, pos, segv, zero = gpu_check.gcm_inputs(sb, sl, H, torch.device("cuda"), dtype=torch.bfloat16)
    params = [*tables, pos, segv]
    kw = dict(zero_mask=zero, pos_table=pos, word_pos=sb.word_pos, seg_vec=segv)
    if provider == "embedding_bag_cat":
        f = lambda: gpu_check.gcm_user_baseline(tables, sb.attr_ids, sb.word_offsets, zero, pos, sb.word_pos, segv)
    elif provider == "torch":
        f = lambda: gcm.gather_concat_mean(tables, sb.attr_ids, sb.word_offsets, impl="torch", **kw)
    else:
        f = lambda: gcm.gather_concat_mean(tables, sb.attr_ids, sb.word_offsets, impl="triton",
                                           backward=provider.removeprefix("triton_"), **kw)
    g_out = torch.randn(sb.n_words, sum(sl.dims), device="cuda", dtype=torch.bfloat16)
    fwd_bytes, bwd_bytes = gpu_check.gather_bytes(sb, sl, zero, es=2)
    _run(benchmark, lambda: torch.autograd.grad(f(), params, g_out),
         {"segment": segment, "provider": provider, "n_words": sb.n_words, "n_actions": int(sb.attr_ids.shape[0]),
          "bytes": fwd_bytes + bwd_bytes})


@pytest.mark.parametrize("provider", ["triton", "torch", "full_logits"])
@pytest.mark.parametrize("segment", SEGMENTS)
def test_multi_label_ce_fwd_bwd(benchmark, paper_batch, provider, segment):
    import kernels.multi_label_ce as mlce

    gpu_check, segs, H = paper_batch
    sl, sb = segs[segment]
    hidden, weights, biases = gpu_check.ce_inputs(sb, sl, H, torch.device("cuda"), seed=1)
    params = [hidden, *weights, *biases]
    args = (sb.label_offsets, sb.label_ids)
    if provider == "full_logits":
        loss_fn = lambda: gpu_check.ce_full_logits(hidden, weights, biases, *args)
    else:
        loss_fn = lambda: mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, *args, impl=provider)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        torch.autograd.grad(loss.sum(), params)

    M, V = hidden.shape[0], sum(sl.vocabs)
    _run(benchmark, step, {"segment": segment, "provider": provider, "M": M, "V_total": V, "H": H,
                           "model_gflop": 8 * M * H * V / 1e9})
