"""The Triton kernels under TRITON_INTERPRET=1 (set by the root conftest.py), on CPU tensors.

Three-way (docs/KERNELS.md, tests/tolerances.py): for the output and every gradient,
``|kernel - ref64| <= 2 * |ref_lowp - ref64| + ATOL[dtype]``, where ref_lowp is the torch reference
in the kernel's dtype and ref64 the definition in float64 on the same (already rounded) inputs.

The interpreter runs program instances one after another (~2 ms each), so grids stay small: the
launchers pick large blocks when interpreting, and the tests that need several programs per axis
shrink the blocks through the modules' CONFIG dicts.  Atomics never race here; races only show on
a GPU (benchmarks/gpu_check.py re-checks both kernels there).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_kernels_reference import (
    DIMS,
    LOWP,
    VOCABS,
    ce_dense64,
    ce_inputs,
    gcm_naive64,
    random_labels,
    random_tables,
    random_words,
)
from tolerances import assert_kernel_close

import kernels.gather_concat_mean as gcm
import kernels.multi_label_ce as mlce
from kernels.dispatch import KernelUnavailableError, interpreter_enabled, triton_importable
from kernels.gather_concat_mean import gather_concat_mean
from kernels.multi_label_ce import multi_label_softmax_ce, multi_label_softmax_ce_grouped

pytestmark = pytest.mark.skipif(not (triton_importable() and interpreter_enabled()),
                                reason="needs triton and TRITON_INTERPRET=1 (set by the root conftest.py)")


@pytest.fixture(autouse=True)
def _single_threaded():
    """One torch thread and one BLAS thread.  The interpreter runs tl.dot through numpy, whose
    OpenBLAS threads spin-wait on a busy 2-core machine: measured 40 ms for a 32x16x1024 matmul,
    against 0.3 ms single-threaded (the whole file went from minutes to seconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency, pinned in constraints/
        limit = threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover - then only slower
        limit = contextlib.nullcontext()
    with limit:
        yield
    torch.set_num_threads(n)


def grads(out, inputs, grad_out):
    """autograd.grad over the inputs that require grad (None for the others)."""
    live = [x for x in inputs if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(out, live, grad_out))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


def as64(ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


# ------------------------------------------------------------------------------------------------
# gather_concat_mean
# ------------------------------------------------------------------------------------------------


def gcm_extras64(out64, zero_mask, add64, pos64, word_pos, seg64):
    if zero_mask is not None:
        out64 = out64.masked_fill(zero_mask[:, None], 0.0)
    if add64 is not None:
        out64 = out64 + add64
    if pos64 is not None:
        out64 = out64 + pos64[word_pos.long()]
    if seg64 is not None:
        out64 = out64 + seg64
    return out64


def check_gcm_three_way(gen, dtype, n_words, backward, fused: bool, vocabs=VOCABS, dims=DIMS):
    ids, offs = random_words(gen, n_words, vocabs, padding=True)
    tables = random_tables(gen, dtype, vocabs, dims)
    D = sum(dims)
    zero_mask = add = pos = word_pos = seg = None
    if fused:
        zero_mask = torch.rand(n_words, generator=gen) < 0.4
        add = torch.randn(n_words, D, generator=gen).to(dtype).requires_grad_()
        pos = torch.randn(11, D, generator=gen).to(dtype).requires_grad_()
        word_pos = torch.randint(0, 11, (n_words,), generator=gen, dtype=torch.int32)
        seg = torch.randn(D, generator=gen).to(dtype).requires_grad_()
    kw = dict(zero_mask=zero_mask, add=add, pos_table=pos, word_pos=word_pos, seg_vec=seg)
    out = gather_concat_mean(tables, ids, offs, impl="triton", backward=backward, **kw)
    ref = gather_concat_mean(tables, ids, offs, impl="torch", **kw)
    assert out.dtype == ref.dtype == dtype and out.shape == (n_words, D)

    params = [*tables, add, pos, seg]
    params64 = as64(params)
    t64, (add64, pos64, seg64) = params64[:len(tables)], params64[len(tables):]
    ref64 = gcm_extras64(gcm_naive64(t64, ids, offs), zero_mask, add64, pos64, word_pos, seg64)
    assert_kernel_close(out, ref, ref64, dtype, "forward")

    g_out = torch.randn(n_words, D, generator=gen).to(dtype)
    g_kernel, g_ref = grads(out, params, g_out), grads(ref, params, g_out)
    g64 = grads(ref64, params64, g_out.double()) if n_words else [torch.zeros_like(p) if p is not None else None
                                                                   for p in params64]
    names = [f"grad tables[{k}]" for k in range(len(tables))] + ["grad add", "grad pos_table", "grad seg_vec"]
    for name, gk, gr, g6 in zip(names, g_kernel, g_ref, g64):
        if gk is None:
            continue
        assert gk.dtype == dtype, name
        assert_kernel_close(gk, gr, g6, dtype, name)
    for k in range(len(tables)):
        assert bool((g_kernel[k][0] == 0).all()), "padding row got a gradient"
    if n_words:
        assert bool((out[0] == 0).all()) or fused, "an empty word must give a zero row"
    return ids, offs


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("backward", gcm.BACKWARD_VARIANTS)
@pytest.mark.parametrize("n_words", [0, 255])
def test_gather_concat_mean_three_way(dtype, backward, n_words):
    # random_words: empty words, a long word with a repeated id, padding ids; vocabs (5, 2, 1023)
    gen = torch.Generator().manual_seed(10 * n_words + LOWP.index(dtype) + 100 * (backward == "sorted"))
    ids, _ = check_gcm_three_way(gen, dtype, n_words, backward, fused=False)
    if n_words:
        assert bool((ids == 0).any()), "the case must contain padding ids"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", gcm.BACKWARD_VARIANTS)
def test_gather_concat_mean_fused_zero_add_position_segment(dtype, backward):
    gen = torch.Generator().manual_seed(7 + LOWP.index(dtype) + 10 * (backward == "sorted"))
    check_gcm_three_way(gen, dtype, 131, backward, fused=True)


@pytest.mark.parametrize("backward", gcm.BACKWARD_VARIANTS)
def test_gather_concat_mean_many_programs(monkeypatch, backward):
    # Small blocks: several word blocks, column blocks that cut through tables (D = 21, BLOCK_D = 8),
    # and sorted runs of one id that span several BLOCK_E blocks.
    monkeypatch.setitem(gcm.CONFIG, "block_w", 4)
    monkeypatch.setitem(gcm.CONFIG, "block_d", 8)
    monkeypatch.setitem(gcm.CONFIG, "block_e", 16)
    gen = torch.Generator().manual_seed(3)
    check_gcm_three_way(gen, torch.float32, 67, backward, fused=True)


@pytest.mark.parametrize("backward", gcm.BACKWARD_VARIANTS)
def test_gather_concat_mean_fp32_accumulation_of_hot_rows(backward):
    # 4096 actions all on one bf16 row (the hottest shop): a bf16 running sum would stall far short.
    n = 4096
    table = torch.randn(3, 2, dtype=torch.bfloat16).requires_grad_()
    ids = torch.full((n, 1), 2, dtype=torch.int32)
    offs = torch.arange(n + 1, dtype=torch.int32)  # one action per word
    out = gather_concat_mean([table], ids, offs, impl="triton", backward=backward)
    g_out = torch.randn(n, 2, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    (g,) = torch.autograd.grad(out, [table], g_out)
    expected = g_out.double().sum(0)
    assert torch.allclose(g[2].double(), expected, rtol=2 ** -8, atol=0), (g[2], expected)
    assert bool((g[0] == 0).all() and (g[1] == 0).all())


def test_gather_concat_mean_heterogeneous_tables_and_int64_ids():
    # Six tables with dims summing to 128 (the paper's long-term layout), a 2-row table among them.
    vocabs, dims = (4, 2, 19, 1031, 97, 25), (8, 4, 8, 64, 32, 12)
    gen = torch.Generator().manual_seed(5)
    ids, offs = random_words(gen, 97, vocabs, padding=False, max_len=9)
    tables = random_tables(gen, torch.float32, vocabs, dims)
    out = gather_concat_mean(tables, ids.long(), offs.long(), impl="triton")
    ref = gather_concat_mean(tables, ids, offs, impl="torch")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_gather_concat_mean_compile_traces_the_custom_op():
    gen = torch.Generator().manual_seed(11)
    ids, offs = random_words(gen, 41, VOCABS, padding=True)
    tables = random_tables(gen, torch.float32)
    pos = torch.randn(7, sum(DIMS), generator=gen, requires_grad=True)
    word_pos = torch.randint(0, 7, (41,), generator=gen)
    zero = torch.rand(41, generator=gen) < 0.3

    def f(*tabs):
        return gather_concat_mean(list(tabs), ids, offs, zero_mask=zero, pos_table=pos, word_pos=word_pos,
                                  impl="triton", backward="sorted")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c, out_e = compiled(*tables), f(*tables)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    g = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, [*tables, pos], g), torch.autograd.grad(out_e, [*tables, pos], g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_gather_concat_mean_rejects_bad_fusion_inputs():
    tables = [torch.randn(4, 2)]
    ids, offs = torch.ones(3, 1, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="backward must be one of"):
        gather_concat_mean(tables, ids, offs, impl="triton", backward="scatter")
    with pytest.raises(ValueError, match="zero_mask must be bool"):
        gather_concat_mean(tables, ids, offs, zero_mask=torch.zeros(1, dtype=torch.int32), impl="triton")
    with pytest.raises(ValueError, match="pos_table and word_pos go together"):
        gather_concat_mean(tables, ids, offs, pos_table=torch.randn(3, 2), impl="triton")
    with pytest.raises(ValueError, match=r"seg_vec must be \[D=2\]"):
        gather_concat_mean(tables, ids, offs, seg_vec=torch.randn(3), impl="triton")


# ------------------------------------------------------------------------------------------------
# multi_label_softmax_ce
# ------------------------------------------------------------------------------------------------


def check_ce_three_way(gen, M, H, vocabs, dtype, normalize, with_bias=(True,), repeats=True, grouped=True):
    """All heads in one grouped Triton call against the per-head torch reference and dense float64."""
    hidden = torch.randn(M, H, generator=gen).to(dtype).requires_grad_()
    weights, biases, offsets, ids = [], [], [], []
    for k, V in enumerate(vocabs):
        # Logits of std ~2 at every H, as a trained head's: with test_kernels_reference's 0.5 scale they
        # reach +-50 at H = 507, and the fp32 rounding of a loss near 185 alone exceeds fp32's atol.
        w = (torch.randn(V, H, generator=gen) * (2 / H ** 0.5)).to(dtype).requires_grad_()
        b = torch.randn(V, generator=gen).to(dtype).requires_grad_() if with_bias[k % len(with_bias)] else None
        o, i = random_labels(gen, M, V, repeats=repeats)
        weights.append(w)
        biases.append(b)
        offsets.append(o)
        ids.append(i)
    if grouped:
        loss = multi_label_softmax_ce_grouped(hidden, weights, biases, offsets, ids, normalize, impl="triton")
    else:
        loss = multi_label_softmax_ce(hidden, weights[0], biases[0], offsets[0], ids[0], normalize,
                                      impl="triton")[None]
    ref = multi_label_softmax_ce_grouped(hidden, weights, biases, offsets, ids, normalize, impl="torch")
    assert loss.dtype == torch.float32 and loss.shape == (len(vocabs), M)

    params = [hidden, *weights, *biases]
    params64 = as64(params)
    n = len(vocabs)
    ref64 = torch.stack([ce_dense64(params64[0], params64[1 + k], params64[1 + n + k], offsets[k], ids[k], normalize)
                         for k in range(n)]) if M else torch.zeros(n, 0, dtype=torch.float64)
    # The loss is fp32 arithmetic on the rounded inputs whatever their dtype: fp32's tolerance.
    assert_kernel_close(loss, ref, ref64, torch.float32, "loss")
    if M >= 2:
        assert bool((loss[:, 0] == 0).all()), "a row without labels must give 0"

    g = torch.rand(n, M, generator=gen) + 0.5  # a non-uniform upstream gradient
    g_kernel, g_ref = grads(loss, params, g), grads(ref, params, g)
    g64 = grads(ref64, params64, g.double()) if M else [None if p is None else torch.zeros_like(p) for p in params64]
    names = ["grad hidden"] + [f"grad weight[{k}]" for k in range(n)] + [f"grad bias[{k}]" for k in range(n)]
    for name, gk, gr, g6 in zip(names, g_kernel, g_ref, g64):
        if gk is None:
            continue
        assert gk.dtype == dtype, name
        assert_kernel_close(gk, gr, g6, dtype, name)
    return loss


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(37, 13, 1023), (5, 7, 3), (255, 507, 123)])
def test_multi_label_ce_three_way(dtype, normalize, shape):
    M, H, V = shape
    gen = torch.Generator().manual_seed(100 * LOWP.index(dtype) + 10 * normalize + M)
    check_ce_three_way(gen, M, H, (V,), dtype, normalize, grouped=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_label_ce_grouped_smallest_and_largest_vocab_in_one_call(dtype):
    # The paper's largest head (shop, 85,124) beside a 2-class head and a bias-free one.
    gen = torch.Generator().manual_seed(17 + LOWP.index(dtype))
    check_ce_three_way(gen, 19, 16, (2, 85124, 57), dtype, normalize=True, with_bias=(True, True, False))


@pytest.mark.parametrize("normalize", [True, False])
def test_multi_label_ce_many_programs(monkeypatch, normalize):
    # Small blocks: several row blocks, several chunks per head (combined by logsumexp), chunk ends that
    # are not tile ends, and several pass-2 tiles per head.
    for key, value in dict(block_m=32, block_v=16, v_chunk=48, block_m1=16, block_m2=16, block_v2=32).items():
        monkeypatch.setitem(mlce.CONFIG, key, value)
    gen = torch.Generator().manual_seed(23 + normalize)
    check_ce_three_way(gen, 53, 24, (3, 203, 101), torch.float32, normalize, with_bias=(True, False))


@pytest.mark.parametrize("block_k", [8, 16])
def test_multi_label_ce_streamed_k(monkeypatch, block_k):
    # The GPU's ieee fp32 path (and H > 256): the logits stream over H in BLOCK_K columns, H not a
    # multiple of BLOCK_K, several row blocks, chunks and pass-2 tiles.
    for key, value in dict(block_m=16, block_v=16, v_chunk=48, block_m1=16, block_m2=16, block_v2=32,
                           block_k=block_k).items():
        monkeypatch.setitem(mlce.CONFIG, key, value)
    gen = torch.Generator().manual_seed(31 + block_k)
    check_ce_three_way(gen, 37, 20, (3, 131), torch.float32, True, with_bias=(True, False))


def test_multi_label_ce_no_rows_and_no_labels():
    gen = torch.Generator().manual_seed(29)
    check_ce_three_way(gen, 0, 8, (17, 2), torch.float32, normalize=True)
    # Rows but not a single label anywhere: zero loss and zero gradients.
    hidden, weight, bias = ce_inputs(gen, 6, 8, 17, torch.float32)
    empty = torch.zeros(7, dtype=torch.int32)
    loss = multi_label_softmax_ce(hidden, weight, bias, empty, torch.zeros(0, dtype=torch.int32), impl="triton")
    assert bool((loss == 0).all())
    for g in torch.autograd.grad(loss.sum(), [hidden, weight, bias]):
        assert bool((g == 0).all())


def test_multi_label_ce_partial_requires_grad():
    gen = torch.Generator().manual_seed(31)
    hidden, weight, bias = ce_inputs(gen, 21, 12, 77, torch.float32)
    offsets, ids = random_labels(gen, 21, 77)
    weight.requires_grad_(False)  # a frozen head: only dHidden and dBias
    loss = multi_label_softmax_ce(hidden, weight, bias, offsets, ids, impl="triton")
    ref = multi_label_softmax_ce(hidden, weight, bias, offsets, ids, impl="torch")
    for a, b in zip(torch.autograd.grad(loss.sum(), [hidden, bias]), torch.autograd.grad(ref.sum(), [hidden, bias])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hidden.requires_grad_(False)  # a frozen encoder: only the head
    weight.requires_grad_(True)
    loss = multi_label_softmax_ce(hidden, weight, None, offsets, ids, normalize=False, impl="triton")
    ref = multi_label_softmax_ce(hidden, weight, None, offsets, ids, normalize=False, impl="torch")
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), weight)[0], torch.autograd.grad(ref.sum(), weight)[0],
                               rtol=1e-5, atol=1e-6)


def test_multi_label_ce_autocast_rounds_operands_like_linear():
    # Under autocast the matmul operands are rounded to the autocast dtype (as F.linear would do) and
    # accumulated in fp32: the same as feeding bf16-rounded fp32 inputs without autocast.
    gen = torch.Generator().manual_seed(37)
    hidden, weight, bias = ce_inputs(gen, 29, 16, 131, torch.float32)
    offsets, ids = random_labels(gen, 29, 131)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = multi_label_softmax_ce(hidden, weight, bias, offsets, ids, impl="triton")
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss.sum(), [hidden, weight])
    assert gh.dtype == gw.dtype == torch.float32
    h16 = hidden.detach().to(torch.bfloat16).float().requires_grad_()
    w16 = weight.detach().to(torch.bfloat16).float().requires_grad_()
    ref = multi_label_softmax_ce(h16, w16, bias, offsets, ids, impl="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    rh, rw = torch.autograd.grad(ref.sum(), [h16, w16])
    # dz is rounded to bf16 before its two products, as autocast's backward of F.linear does
    torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-3)


def test_multi_label_ce_compile_traces_the_custom_op():
    gen = torch.Generator().manual_seed(41)
    M, H = 23, 12
    hidden = torch.randn(M, H, generator=gen, requires_grad=True)
    weights = [torch.randn(v, H, generator=gen, requires_grad=True) for v in (5, 301)]
    biases = [None, torch.randn(301, generator=gen, requires_grad=True)]
    labels = [random_labels(gen, M, v) for v in (5, 301)]

    def f(h, w0, w1, b1):
        return multi_label_softmax_ce_grouped(h, [w0, w1], [None, b1], [o for o, _ in labels], [i for _, i in labels],
                                              impl="triton").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    args = [hidden, weights[0], weights[1], biases[1]]
    out_c, out_e = compiled(*args), f(*args)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(out_c, args), torch.autograd.grad(out_e, args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_multi_label_ce_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="H <= 512"):
        multi_label_softmax_ce(torch.randn(2, 600), torch.randn(3, 600), None, torch.tensor([0, 1, 1]),
                               torch.tensor([2]), impl="triton")
    with pytest.raises(TypeError, match="one dtype per call"):
        multi_label_softmax_ce_grouped(torch.randn(2, 4), [torch.randn(3, 4), torch.randn(3, 4).double()], None,
                                       [torch.tensor([0, 1, 1])] * 2, [torch.tensor([2])] * 2, impl="triton")


def test_explicit_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match=r"needs CUDA tensors.*impl='torch'"):
        multi_label_softmax_ce(torch.randn(2, 4), torch.randn(3, 4), None, torch.tensor([0, 1, 1]),
                               torch.tensor([2]), impl="triton")
    with pytest.raises(KernelUnavailableError, match=r"needs CUDA tensors"):
        gather_concat_mean([torch.randn(4, 2)], torch.ones(3, 1, dtype=torch.int32),
                           torch.tensor([0, 3], dtype=torch.int32), impl="triton")
