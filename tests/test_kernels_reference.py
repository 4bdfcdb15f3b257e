"""The torch references of the kernels against naive float64 implementations, forward and gradients.

The references are also the CPU production path, so these tests are the ground truth the Triton
kernels are checked against (three-way, tests/tolerances.py, in tests/test_kernels_triton.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_ref64

import kernels.multi_label_ce as mlce
from kernels.dispatch import KernelUnavailableError, TritonNotImplementedError, resolve_impl
from kernels.gather_concat_mean import gather_concat_mean, gather_concat_mean_reference
from kernels.multi_label_ce import (
    multi_label_softmax_ce,
    multi_label_softmax_ce_grouped,
    multi_label_softmax_ce_reference,
)

LOWP = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spin-waits made these tests ~20x slower (measured: 12 ms vs 100-450 ms per training step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ------------------------------------------------------------------------------------------------
# gather_concat_mean
# ------------------------------------------------------------------------------------------------

VOCABS = (5, 2, 1023)
DIMS = (7, 1, 13)


def gcm_naive64(tables64: list[torch.Tensor], attr_ids: torch.Tensor,
                word_offsets: torch.Tensor) -> torch.Tensor:
    """Word by word, action by action, in float64: the definition, differentiable by autograd."""
    offs = word_offsets.tolist()
    ids = attr_ids.tolist()
    rows = []
    for w in range(len(offs) - 1):
        a0, a1 = offs[w], offs[w + 1]
        parts = []
        for k, t in enumerate(tables64):
            acc = torch.zeros(t.shape[1], dtype=torch.float64)
            for a in range(a0, a1):
                if ids[a][k] != 0:  # padding contributes a zero vector ...
                    acc = acc + t[ids[a][k]]
            parts.append(acc / max(a1 - a0, 1))  # ... but counts in the denominator
        rows.append(torch.cat(parts))
    if not rows:  # no words: an empty output still connected to the tables, so autograd.grad works
        return torch.zeros(0, sum(t.shape[1] for t in tables64), dtype=torch.float64) + 0 * sum(
            t.sum() for t in tables64)
    return torch.stack(rows)


def random_words(gen: torch.Generator, n_words: int, vocabs, padding: bool, max_len: int = 6):
    lengths = torch.randint(0, max_len + 1, (n_words,), generator=gen)  # 0: empty words
    if n_words >= 3:
        lengths[0] = 0
        lengths[1] = max_len  # long word, and below a duplicate-heavy word
    offsets = torch.zeros(n_words + 1, dtype=torch.int32)
    offsets[1:] = lengths.cumsum(0)
    n_actions = int(offsets[-1])
    low = 0 if padding else 1
    ids = torch.stack([torch.randint(low, v, (n_actions,), generator=gen) if v > low else
                       torch.full((n_actions,), low) for v in vocabs], dim=1)
    if n_words >= 3:
        a0, a1 = int(offsets[1]), int(offsets[2])
        ids[a0:a1, 2] = 7  # the same id in every action of a word
        ids[a0, 2] = 9
    return ids.to(torch.int32), offsets


def random_tables(gen, dtype, vocabs=VOCABS, dims=DIMS):
    # Row 0 is deliberately non-zero: padding must contribute zero whatever the table holds.
    return [torch.randn(v, d, generator=gen).to(dtype).requires_grad_() for v, d in zip(vocabs, dims)]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("n_words", [0, 255])
@pytest.mark.parametrize("padding", [False, True])
def test_gather_concat_mean_reference_matches_float64(dtype, n_words, padding):
    gen = torch.Generator().manual_seed(1000 * n_words + 10 * padding + LOWP.index(dtype))
    ids, offs = random_words(gen, n_words, VOCABS, padding)
    tables = random_tables(gen, dtype)
    if padding and n_words:
        assert bool((ids == 0).any()), "the padding case must contain id 0"

    out = gather_concat_mean_reference(tables, ids, offs)
    assert out.dtype == dtype and out.shape == (n_words, sum(DIMS))

    tables64 = [t.detach().double().requires_grad_() for t in tables]  # the same rounded values
    ref64 = gcm_naive64(tables64, ids, offs)
    assert_close_to_ref64(out, ref64, dtype, "forward")

    grad_out = torch.randn(n_words, sum(DIMS), generator=gen).to(dtype)
    grads = torch.autograd.grad(out, tables, grad_out)
    grads64 = torch.autograd.grad(ref64, tables64, grad_out.double())
    for k, (g, g64) in enumerate(zip(grads, grads64)):
        assert g.dtype == dtype
        assert_close_to_ref64(g, g64, dtype, f"grad tables[{k}]")
        assert bool((g[0] == 0).all()), "padding row got a gradient"
    if n_words:
        assert bool((out[0] == 0).all()), "an empty word must give a zero row"


def test_gather_concat_mean_fp32_accumulation_of_hot_rows():
    # 4096 actions all on one bf16 row: a bf16 running sum would stall far from 4096 * g.
    n = 4096
    table = torch.zeros(3, 2, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.full((n, 1), 2, dtype=torch.int32)
    offs = torch.arange(n + 1, dtype=torch.int32)  # one action per word
    out = gather_concat_mean_reference([table], ids, offs)
    (g,) = torch.autograd.grad(out, [table], torch.full((n, 2), 0.1, dtype=torch.bfloat16))
    expected = n * float(torch.tensor(0.1, dtype=torch.bfloat16))
    assert abs(float(g[2, 0]) - expected) <= 2 ** -8 * expected


def test_gather_concat_mean_partial_requires_grad_and_public_hooks():
    gen = torch.Generator().manual_seed(7)
    ids, offs = random_words(gen, 31, VOCABS, padding=False)
    tables = random_tables(gen, torch.float32)
    tables[1].requires_grad_(False)
    ref = gather_concat_mean_reference(tables, ids, offs)
    for impl in ("torch", "auto"):  # auto is torch on CPU
        assert torch.equal(gather_concat_mean(tables, ids, offs, impl=impl), ref)

    zero = torch.tensor([3, 0, 17])
    zero_mask = torch.zeros(31, dtype=torch.bool)
    zero_mask[zero] = True
    add = torch.randn(31, sum(DIMS), generator=gen, requires_grad=True)
    out = gather_concat_mean(tables, ids, offs, zero_mask=zero_mask, add=add, impl="torch")
    expected = ref.detach().clone()
    expected[zero] = 0
    torch.testing.assert_close(out, expected + add, rtol=0, atol=0)
    g_out = torch.randn_like(out)
    g0, g2, g_add = torch.autograd.grad(out, [tables[0], tables[2], add], g_out)
    assert torch.equal(g_add, g_out)
    g_masked = g_out.clone()
    g_masked[zero] = 0  # zeroed words pass no gradient into the tables
    again = gather_concat_mean_reference(tables, ids, offs)
    r0, r2 = torch.autograd.grad(again, [tables[0], tables[2]], g_masked)
    torch.testing.assert_close(g0, r0)
    torch.testing.assert_close(g2, r2)


def test_gather_concat_mean_rejects_bad_inputs():
    t = [torch.randn(4, 2)]
    i32 = dict(dtype=torch.int32)
    with pytest.raises(ValueError, match=r"attr_ids must be \[n_actions, K=1\]"):
        gather_concat_mean_reference(t, torch.zeros(3, 2, **i32), torch.tensor([0, 3], **i32))
    with pytest.raises(ValueError, match="word_offsets"):
        gather_concat_mean_reference(t, torch.zeros(3, 1, **i32), torch.tensor([0, 2], **i32))
    with pytest.raises(TypeError, match="int32 or int64"):
        gather_concat_mean_reference(t, torch.zeros(3, 1), torch.tensor([0, 3], **i32))


# ------------------------------------------------------------------------------------------------
# multi_label_softmax_ce
# ------------------------------------------------------------------------------------------------


def ce_dense64(hidden, weight, bias, offsets, ids, normalize):
    """Full float64 logits; F.cross_entropy with probability targets y/|y|, or the explicit sum."""
    z = hidden @ weight.t() + (bias if bias is not None else 0)  # [M, V]
    M, V = z.shape
    counts = (offsets[1:] - offsets[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(M), counts)
    multi_hot = torch.zeros(M, V, dtype=torch.float64).index_put_((rows, ids.long()), torch.ones(len(rows),
                                                                  dtype=torch.float64), accumulate=True)
    has = counts > 0
    if normalize:
        target = multi_hot / counts.clamp(min=1)[:, None]
        loss = F.cross_entropy(z, target, reduction="none")
    else:
        lse = torch.logsumexp(z, dim=1)
        loss = (multi_hot * (lse[:, None] - z)).sum(1)
    return torch.where(has, loss, torch.zeros_like(loss))


def random_labels(gen, M, V, max_labels=4, repeats=False):
    counts = torch.randint(0, max_labels + 1, (M,), generator=gen).clamp(max=V)
    if M >= 2:
        counts[0] = 0  # a row with no labels
        counts[1] = min(max_labels, V)
    ids = []
    for c in counts.tolist():
        row = torch.randperm(V, generator=gen)[:c].sort().values  # distinct, ascending (as collate)
        if repeats and len(row) >= 2:
            row[1] = row[0]  # a repeated label
        ids.append(row)
    offsets = torch.zeros(M + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    return offsets, torch.cat(ids).to(torch.int32) if ids else torch.zeros(0, dtype=torch.int32)


def ce_inputs(gen, M, H, V, dtype, with_bias=True):
    hidden = torch.randn(M, H, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).mul(0.5).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=gen).to(dtype).requires_grad_() if with_bias else None
    return hidden, weight, bias


def check_ce_against_dense(gen, M, H, V, dtype, normalize, with_bias=True, repeats=False, chunk_rows=None):
    hidden, weight, bias = ce_inputs(gen, M, H, V, dtype, with_bias)
    offsets, ids = random_labels(gen, M, V, repeats=repeats)
    loss = multi_label_softmax_ce_reference(hidden, weight, bias, offsets, ids, normalize,
                                            chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and loss.shape == (M,)

    params = [hidden, weight] + ([bias] if with_bias else [])
    params64 = [p.detach().double().requires_grad_() for p in params]
    b64 = params64[2] if with_bias else None
    ref = ce_dense64(params64[0], params64[1], b64, offsets, ids, normalize)
    # The loss is computed in fp32 from the rounded inputs: fp32 tolerance whatever the input dtype.
    assert_close_to_ref64(loss, ref, torch.float32, "loss")

    g = torch.rand(M, generator=gen) + 0.5  # a non-uniform upstream gradient
    grads = torch.autograd.grad(loss, params, g)
    grads64 = torch.autograd.grad(ref, params64, g.double()) if M else [torch.zeros_like(p) for p in params64]
    for name, gr, g64 in zip(("hidden", "weight", "bias"), grads, grads64):
        assert gr.dtype == dtype
        assert_close_to_ref64(gr, g64, dtype, f"grad {name}")
    return loss


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(37, 13, 1023), (5, 7, 3)])
def test_multi_label_ce_matches_dense(dtype, normalize, shape):
    gen = torch.Generator().manual_seed(100 * LOWP.index(dtype) + 10 * normalize + shape[0])
    loss = check_ce_against_dense(gen, *shape, dtype, normalize)
    assert float(loss[0].detach()) == 0.0, "a row without labels must give 0"


@pytest.mark.parametrize("normalize", [True, False])
def test_multi_label_ce_repeated_labels_no_bias_and_chunks(normalize):
    gen = torch.Generator().manual_seed(11 + normalize)
    check_ce_against_dense(gen, 23, 9, 101, torch.float32, normalize, with_bias=False, repeats=True)
    check_ce_against_dense(gen, 23, 9, 101, torch.float32, normalize, repeats=True, chunk_rows=4)


def test_multi_label_ce_empty_rows():
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias = ce_inputs(gen, 0, 8, 17, torch.float32)
    loss = multi_label_softmax_ce(hidden, weight, bias, torch.zeros(1, dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.int32), impl="torch")
    assert loss.shape == (0,)
    gh, gw, gb = torch.autograd.grad(loss.sum(), [hidden, weight, bias])
    assert gh.shape == (0, 8) and bool((gw == 0).all()) and bool((gb == 0).all())


def test_multi_label_ce_chunked_equals_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    M, H, V = 61, 16, 257
    hidden, weight, bias = ce_inputs(gen, M, H, V, torch.float32)
    offsets, ids = random_labels(gen, M, V)

    def loss_and_grads():
        loss = multi_label_softmax_ce(hidden, weight, bias, offsets, ids, impl="torch")
        return (loss, *torch.autograd.grad(loss.sum(), [hidden, weight, bias]))

    whole = loss_and_grads()  # 61 * 257 < CHUNK_ELEMS: one chunk

    # With a small budget, no logits buffer may exceed it, and the results must not change.
    seen = []
    real_logits = mlce._logits
    monkeypatch.setattr(mlce, "CHUNK_ELEMS", 4 * V)
    monkeypatch.setattr(mlce, "_logits",
                        lambda h, w, b: seen.append(h.shape[0] * w.shape[0]) or real_logits(h, w, b))
    chunked = loss_and_grads()
    assert len(seen) == 2 * 16 and max(seen) <= 4 * V  # ceil(61 / 4) chunks, forward and backward
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_multi_label_ce_grouped_equals_per_head():
    gen = torch.Generator().manual_seed(9)
    M, H = 29, 12
    vocabs = (3, 1023, 50)
    hidden = torch.randn(M, H, generator=gen, requires_grad=True)
    weights = [torch.randn(v, H, generator=gen, requires_grad=True) for v in vocabs]
    biases = [torch.randn(3, generator=gen, requires_grad=True), None, torch.randn(50, generator=gen,
                                                                                    requires_grad=True)]
    labels = [random_labels(gen, M, v) for v in vocabs]
    for normalize in (True, False):
        out = multi_label_softmax_ce_grouped(hidden, weights, biases, [o for o, _ in labels],
                                             [i for _, i in labels], normalize, impl="torch")
        assert out.shape == (3, M)
        each = torch.stack([multi_label_softmax_ce(hidden, w, b, o, i, normalize, impl="torch")
                            for w, b, (o, i) in zip(weights, biases, labels)])
        torch.testing.assert_close(out, each, rtol=0, atol=0)
        params = [hidden, *weights, biases[0], biases[2]]
        for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(each.sum(), params)):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    x = torch.zeros(2)
    assert resolve_impl("torch", x) == "torch"
    assert resolve_impl("auto", x) == "torch"  # CPU tensors
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", x)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET.*impl='torch'"):
        resolve_impl("triton", x, op="gather_concat_mean")
    tables = [torch.randn(4, 2)]
    ids, offs = torch.ones(3, 1, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        gather_concat_mean(tables, ids, offs, impl="triton")

    # With the interpreter on: both kernels are registered and run; an op without a Triton
    # implementation still says so.  (auto stays torch on CPU tensors even then.)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", x, op="gather_concat_mean") == "triton"
    assert resolve_impl("triton", x, op="multi_label_softmax_ce") == "triton"
    assert resolve_impl("auto", x, op="multi_label_softmax_ce") == "torch"
    with pytest.raises(TritonNotImplementedError, match="no_such_op: the Triton kernel is not implemented yet"):
        resolve_impl("triton", x, op="no_such_op")
    with pytest.raises(NotImplementedError, match="impl='torch'"):
        resolve_impl("triton", x, op="no_such_op")


def test_multi_label_ce_rejects_bad_inputs():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    ids = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"label_offsets must be \[M \+ 1 = 4\]"):
        multi_label_softmax_ce_reference(h, w, None, torch.tensor([0, 1, 2], dtype=torch.int32), ids)
    with pytest.raises(ValueError, match="from 0 to nnz = 2"):
        multi_label_softmax_ce_reference(h, w, None, torch.tensor([0, 1, 2, 3], dtype=torch.int32), ids)
    with pytest.raises(ValueError, match=r"weight \[V, H\]"):
        multi_label_softmax_ce_reference(h, torch.randn(5, 3), None, torch.tensor([0, 1, 2, 2]), ids)
