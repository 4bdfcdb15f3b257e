"""multi_label_softmax_ce: the masked multi-label pretext loss of one (or every) attribute head.

For row m (a masked word's hidden state) with logits ``z_m = hidden_m @ weight.T + bias`` over a
vocabulary of V and a label multiset ``Y_m`` (CSR: ``label_ids[label_offsets[m]:label_offsets[m+1]]``)::

    normalize=True : loss_m = logsumexp(z_m) - mean_{y in Y_m} z_{m,y}
                            = cross entropy of softmax(z_m) against the distribution y/|y|
    normalize=False: loss_m = sum_{y in Y_m} (logsumexp(z_m) - z_{m,y})

- A row with no labels gives 0 (and no gradient).  M = 0 gives an empty loss.
- Labels are taken as given: collate stores distinct values, but a repeated label simply counts
  twice (weight 2/|Y| when normalized), which is what a multi-hot *count* vector means.
- Computed in fp32 whatever the input dtype; the loss is fp32 ``[M]``.

The gradient of loss_m in z_m is ``c_m * softmax(z_m) - sum_{y in Y_m} w_{m,y} e_y`` with
``w = 1/|Y_m|, c_m = 1`` (normalized) or ``w = 1, c_m = |Y_m|`` (sum).  The torch path recomputes
it chunk by chunk of rows (softmax from the saved logsumexp, then the nnz label entries subtracted
in place) and never holds more than one chunk of [M, V].

Triton path (docs/KERNELS.md has the full design and its cost model):

- The [M, V] logits never exist.  Forward: a program holds BLOCK_M rows of hidden and streams weight
  tiles of one vocabulary *chunk* through tl.dot with an online log-sum-exp; the per-chunk partial
  log-sum-exps are combined by a logsumexp over chunks.  Chunks (<= V_CHUNK columns) make the work
  units of a 2-class head and an 85k-class head the same size, so every head of a segment runs in
  one launch without one huge head serialising the grid.  The label logits are a sparse gather done
  by each head's first chunk.
- Backward, two launches, no [M, V] buffer and no atomics on dWeight's dense part:
  pass 1, grid (row blocks x chunks): recompute the tile, ``dz = a*softmax``, dHidden += dz @ W
  (fp32 atomics into dHidden: one per element per chunk), plus the sparse label terms
  (-g*w*W[y] into dHidden, -g*w*h into dWeight[y], -g*w into dBias[y], atomics on nnz rows only);
  pass 2, grid (vocabulary tiles): loop over all row blocks, recompute the tile, dWeight += dz^T @ h
  and dBias += sum dz in registers, then one read-add-write of the tile (race-free: each tile has
  one owner).  Cost: the logits are computed three times (10*H*V FLOPs per row instead of 8).
- Matmul operands are rounded to the compute dtype (the autocast dtype under autocast, else the
  inputs' dtype), accumulation is fp32, and fp32 follows torch's TF32 setting.

File order (as in Liger-Kernel and Cut Cross-Entropy): torch reference → Triton kernels → launchers →
autograd.Function /
torch.library op → public functions.
"""

import functools

import torch

from kernels._triton_utils import (
    cdiv,
    fmax,
    fsum,
    helper,
    int_array,
    interpreting,
    jit,
    next_pow2,
    ptr_array,
    tl,
    tl_dtype,
)
from kernels.dispatch import register_triton, resolve_impl
from kernels.targets import gpu_props, is_gpu, launch_device_type

OP = "multi_label_softmax_ce"

# fp32 logits alive at once in the torch path: 2^22 elements = 16 MiB, i.e. ~49 rows at V = 85k.
# Measured on 2 CPU cores (M=312, V=85124, H=128, fwd+bwd): 49-128 rows per chunk ~0.64 s,
# the full [M, V] at once ~1.05 s (autograd, 106 MB of logits), 16 rows ~1.15 s.
CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# 1. Torch reference (also the CPU production path)
# ----------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, bias, label_offsets, label_ids) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: expected hidden [M, H] and weight [V, H], got {list(hidden.shape)} "
                         f"and {list(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{OP}: bias must be [V={weight.shape[0]}], got {list(bias.shape)}")
    if label_offsets.dim() != 1 or label_offsets.shape[0] != hidden.shape[0] + 1:
        raise ValueError(f"{OP}: label_offsets must be [M + 1 = {hidden.shape[0] + 1}], "
                         f"got {list(label_offsets.shape)}")
    if label_ids.dim() != 1:
        raise ValueError(f"{OP}: label_ids must be 1-D [nnz], got {list(label_ids.shape)}")
    for name, t in (("label_offsets", label_offsets), ("label_ids", label_ids)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: {name} must be int32 or int64, got {t.dtype}")
    if label_offsets.device.type == "cpu" and (int(label_offsets[0]) != 0
                                               or int(label_offsets[-1]) != label_ids.shape[0]):
        raise ValueError(f"{OP}: label_offsets must run from 0 to nnz = {label_ids.shape[0]}, got "
                         f"{int(label_offsets[0])} .. {int(label_offsets[-1])}")


def _chunk_rows(n_rows: int, vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        return max(1, chunk_rows)
    return max(1, min(n_rows, CHUNK_ELEMS // max(vocab, 1)))


def _logits(h32: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(b32, h32, w32.t()) if b32 is not None else h32 @ w32.t()  # [rows, V] fp32


class _MultiLabelCETorch(torch.autograd.Function):
    """Row-chunked: the forward keeps only logsumexp per row; the backward recomputes each chunk's
    logits, so at most ``chunk`` rows of [*, V] fp32 logits exist at any time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, label_offsets, label_ids, normalize: bool, chunk_rows: int | None):
        n_rows = hidden.shape[0]
        h32, w32 = hidden.float(), weight.float()  # no copy when already fp32
        b32 = bias.float() if bias is not None else None
        counts = (label_offsets[1:] - label_offsets[:-1]).long()  # [M] labels per row
        label_row = torch.repeat_interleave(torch.arange(n_rows, device=hidden.device), counts)  # [nnz]
        ids = label_ids.long()  # [nnz]
        if normalize:
            # target y/|y|: weight 1/|Y_m| per label, softmax coefficient 1 (0 for label-less rows)
            label_w = 1.0 / counts.clamp(min=1).float()[label_row]  # [nnz]
            coef = (counts > 0).float()  # [M]
        else:
            label_w = torch.ones(ids.shape[0], device=hidden.device)  # [nnz]
            coef = counts.float()  # [M]: |Y_m| copies of logsumexp

        chunk = _chunk_rows(n_rows, weight.shape[0], chunk_rows)
        lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # [M]
        for i in range(0, n_rows, chunk):
            lse[i:i + chunk] = torch.logsumexp(_logits(h32[i:i + chunk], w32, b32), dim=1)
        # The labels' logits, gathered directly: nnz dot products instead of reading [M, V].
        z_lab = (h32.index_select(0, label_row) * w32.index_select(0, ids)).sum(1)  # [nnz]
        if b32 is not None:
            z_lab = z_lab + b32.index_select(0, ids)
        loss = coef * lse  # [M]
        loss = loss.index_add(0, label_row, -label_w * z_lab)

        ctx.save_for_backward(hidden, weight, bias, lse, coef, label_offsets, label_row, ids, label_w)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, lse, coef, label_offsets, label_row, ids, label_w = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows, chunk = hidden.shape[0], ctx.chunk
        h32, w32 = hidden.float(), weight.float()
        b32 = bias.float() if bias is not None else None
        g = grad_loss.float()  # [M]
        a = g * coef  # [M]: coefficient of softmax(z_m) in d loss / d z_m
        lg = g.index_select(0, label_row) * label_w  # [nnz]: d loss / d z_{m,y} -= g_m * w_{m,y}
        offs = label_offsets.tolist()  # chunk boundaries in the label list (CSR: labels sorted by row)

        dh = torch.zeros_like(h32) if need_h else None  # [M, H] fp32
        dw = torch.zeros_like(w32) if need_w else None  # [V, H] fp32
        db = torch.zeros_like(b32) if need_b and b32 is not None else None  # [V] fp32
        for i in range(0, n_rows, chunk):
            j = min(i + chunk, n_rows)
            hc = h32[i:j]  # [c, H]
            # dz = a_m * softmax(z_m), recomputed from the saved logsumexp, in place: one [c, V] buffer
            dz = _logits(hc, w32, b32)  # [c, V]
            dz.sub_(lse[i:j, None]).exp_().mul_(a[i:j, None])
            # ... minus the labels' weights: a sparse update of the same buffer.  (A separate
            # index_add_ of the label part into dw [V, H] measured ~100 ms at V = 85k on CPU.)
            l0, l1 = offs[i], offs[j]
            if l1 > l0:
                dz.index_put_((label_row[l0:l1] - i, ids[l0:l1]), -lg[l0:l1], accumulate=True)
            if dh is not None:
                dh[i:j] = dz @ w32
            if dw is not None:
                dw.addmm_(dz.t(), hc)
            if db is not None:
                db += dz.sum(0)
        return (
            dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
            None, None, None, None,
        )


def multi_label_softmax_ce_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     label_offsets: torch.Tensor, label_ids: torch.Tensor,
                                     normalize: bool = True, *,
                                     chunk_rows: int | None = None) -> torch.Tensor:
    """Torch reference: per-row loss ``[M]`` fp32 (see the module docstring).

    hidden ``[M, H]``, weight ``[V, H]``, bias ``[V]`` or None, label_offsets int32 ``[M + 1]``,
    label_ids int32 ``[nnz]`` in ``[0, V)``.  ``chunk_rows`` overrides the rows per chunk (default:
    ``CHUNK_ELEMS // V``).  Tested against full logits + F.cross_entropy in
    tests/test_kernels_reference.py.
    """
    _check_inputs(hidden, weight, bias, label_offsets, label_ids)
    return _MultiLabelCETorch.apply(hidden, weight, bias, label_offsets, label_ids, bool(normalize),
                                    chunk_rows)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# Shared layout: heads k = 0..n_heads-1 with weights [V_k, H] reached through a pointer array
# (w_ptrs[k]), all biases concatenated into one fp32 vector (head k's at vstart[k]), and dWeight /
# dBias accumulated into one flat fp32 [sum_k V_k, H] / [sum_k V_k] buffer with the same offsets.
# Forward and pass 1 run over *items*: (head, [v0, v1)) chunks of at most V_CHUNK columns.
# Labels: one CSR per head, concatenated: lab_offs[k, m] .. lab_offs[k, m + 1] index lab_ids.
# ----------------------------------------------------------------------------------------------


@helper
def _to_dot(x, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the matmul operand dtype DOT, once per tile (round to nearest even).

    On a GPU the result *is* DOT (tensor-core operands).  Under the interpreter (UPCAST) it is fp32
    holding DOT-rounded values, because the interpreter's bf16 tl.dot returns garbage and its
    fp32 -> bf16 conversion truncates; products of DOT-rounded values are exact in fp32, so the
    interpreter's results are what a GPU computes up to summation order.
    """
    if UPCAST:
        if x.dtype == DOT:
            out = x.to(tl.float32)
        elif DOT == tl.bfloat16:  # round to nearest even on the bits (finite values: all that reach here)
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(DOT).to(tl.float32)
    else:
        out = x.to(DOT)
    return out


@helper
def _mm(a, b, DOT: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr):
    """``a @ b`` with fp32 accumulation; a and b come from _to_dot."""
    if UPCAST:
        out = tl.dot(a, b, input_precision="ieee")
    elif DOT == tl.float32:
        if TF32:
            out = tl.dot(a, b, input_precision="tf32")
        else:
            out = tl.dot(a, b, input_precision="ieee")  # fp32 means fp32 (torch's default matmul precision)
    else:
        out = tl.dot(a, b)
    return out


@helper
def _logits_k(h_ptr, w_base, rows, rmask, vs, vmask, H, DOT: tl.constexpr, UPCAST: tl.constexpr,
              TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h[rows] @ w[vs].T`` fp32 ``[BLOCK_M, BLOCK_V]``, streamed over H in BLOCK_K columns.

    The path for CUDA-core (FMA) dots, i.e. ieee fp32: an FMA dot keeps, per thread, its rows and
    columns of both operands over the whole K, so K = H = 128 spills at any tile size; a short K
    bounds the registers.  Both operand chunks come from L1/L2 (the tiles are re-read per chunk).
    """
    z = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    r64, v64 = rows.to(tl.int64), vs.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < H
        hk = tl.load(h_ptr + r64[:, None] * H + kc[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wk = tl.load(w_base + v64[:, None] * H + kc[None, :], mask=vmask[:, None] & kmask[None, :], other=0.0)
        z += _mm(_to_dot(hk, DOT, UPCAST), tl.trans(_to_dot(wk, DOT, UPCAST)), DOT, UPCAST, TF32)
    return z


@jit(do_not_specialize=["M"])
def _ce_fwd_kernel(
    part_ptr,  # fp32 [n_heads * MAX_ITEMS, M] partial log-sum-exp of each (item, row); -inf: unused slot
    zlab_ptr,  # fp32 [n_heads, M] each row's label logits, summed (x 1/|Y| when NORMALIZE)
    h_ptr,  # [M, H] hidden rows, contiguous
    w_ptrs,  # int64 [n_heads] data_ptr of each head's weight [V_k, H] (W_DTYPE, contiguous)
    b_ptr,  # fp32 [sum_k V_k] every head's bias, concatenated; 0 for heads without one (HAS_BIAS)
    vstart_ptr,  # int64 [n_heads] head k's first row in the concatenated vocabulary
    item_head_ptr, item_v0_ptr, item_v1_ptr, item_slot_ptr,  # int32 [n_items] the vocabulary chunks
    lab_offs_ptr,  # int64 [n_heads, M + 1] label CSR of every head into lab_ids
    lab_ids_ptr,  # int32/int64 [nnz] label ids, in [0, V_k)
    M, H,
    W_DTYPE: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_K == BLOCK_H: the row block's hidden stays resident as the tensor-core operand and each
    # step loads one [BLOCK_V, H] weight tile; BLOCK_K < BLOCK_H: both stream in K chunks (FMA dots).
    item = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < H
    m2 = rmask[:, None] & hmask[None, :]
    head = tl.load(item_head_ptr + item)
    v0 = tl.load(item_v0_ptr + item)
    v1 = tl.load(item_v1_ptr + item)
    w_base = tl.load(w_ptrs + head).to(tl.pointer_type(W_DTYPE))
    vs0 = tl.load(vstart_ptr + head)
    if BLOCK_K == BLOCK_H:
        hq = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :], mask=m2, other=0.0), DOT, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v in range(v0, v1, BLOCK_V):
        vs = v + tl.arange(0, BLOCK_V)
        vmask = vs < v1
        if BLOCK_K == BLOCK_H:
            w = tl.load(w_base + vs.to(tl.int64)[:, None] * H + hc[None, :], mask=vmask[:, None] & hmask[None, :],
                        other=0.0)  # [BLOCK_V, BLOCK_H]
            z = _mm(hq, tl.trans(_to_dot(w, DOT, UPCAST)), DOT, UPCAST, TF32)  # [BLOCK_M, BLOCK_V] logits
        else:
            z = _logits_k(h_ptr, w_base, rows, rmask, vs, vmask, H, DOT, UPCAST, TF32, BLOCK_M, BLOCK_V, BLOCK_K)
        if HAS_BIAS:
            z += tl.load(b_ptr + vs0 + vs, mask=vmask, other=0.0)[None, :]
        z = tl.where(vmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, fmax(z, 1))  # finite from the first tile on: v0 < v1
        s_i = s_i * tl.exp(m_i - m_new) + fsum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
    slot = tl.load(item_slot_ptr + item).to(tl.int64)
    tl.store(part_ptr + slot * M + rows, m_i + tl.log(s_i), mask=rmask)
    if v0 == 0:  # the head's first chunk also gathers the label logits (nnz dot products, no [M, V])
        lo = lab_offs_ptr + head.to(tl.int64) * (M + 1) + rows
        l0 = tl.load(lo, mask=rmask, other=0)
        cnt = tl.load(lo + 1, mask=rmask, other=0) - l0
        # the same rounded operands as the tiles
        h32 = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :], mask=m2, other=0.0), DOT,
                      UPCAST).to(tl.float32)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in range(0, fmax(cnt, 0)):
            live = rmask & (j < cnt)
            y = tl.load(lab_ids_ptr + l0 + j, mask=live, other=0).to(tl.int64)
            wy = tl.load(w_base + y[:, None] * H + hc[None, :], mask=live[:, None] & hmask[None, :], other=0.0)
            zy = fsum(h32 * _to_dot(wy, DOT, UPCAST).to(tl.float32), 1)
            if HAS_BIAS:
                zy += tl.load(b_ptr + vs0 + y, mask=live, other=0.0)
            acc += tl.where(live, zy, 0.0)
        if NORMALIZE:
            acc = acc / tl.maximum(cnt, 1).to(tl.float32)
        tl.store(zlab_ptr + head.to(tl.int64) * M + rows, acc, mask=rmask)


@jit(do_not_specialize=["M"])
def _ce_bwd_dh_kernel(
    dh_ptr,  # fp32 [M, H] dHidden, zero-initialised; each item atomically adds its chunk's part (NEED_DH)
    dw_ptr,  # fp32 [sum_k V_k, H] flat dWeight: the label rows' sparse part, atomics (NEED_DW)
    db_ptr,  # fp32 [sum_k V_k] flat dBias: the label part, atomics (NEED_DB)
    h_ptr, w_ptrs, b_ptr, vstart_ptr,  # as in the forward
    item_head_ptr, item_v0_ptr, item_v1_ptr,  # int32 [n_items]
    lse_ptr,  # fp32 [n_heads, M] log-sum-exp from the forward
    a_ptr,  # fp32 [n_heads, M] g_m * coef_m: the coefficient of softmax(z_m) in dz_m
    lg_ptr,  # fp32 [n_heads, M] g_m * w_m: each label occurrence subtracts lg_m at z_{m,y}
    lab_offs_ptr, lab_ids_ptr,  # label CSR, as in the forward
    M, H,
    W_DTYPE: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    item = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < H
    m2 = rmask[:, None] & hmask[None, :]
    head = tl.load(item_head_ptr + item)
    v0 = tl.load(item_v0_ptr + item)
    v1 = tl.load(item_v1_ptr + item)
    w_base = tl.load(w_ptrs + head).to(tl.pointer_type(W_DTYPE))
    vs0 = tl.load(vstart_ptr + head)
    hm = head.to(tl.int64) * M + rows
    dh = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    if NEED_DH:
        if BLOCK_K == BLOCK_H:
            hq = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :], mask=m2, other=0.0), DOT,
                         UPCAST)
        lse = tl.load(lse_ptr + hm, mask=rmask, other=0.0)
        a = tl.load(a_ptr + hm, mask=rmask, other=0.0)
        for v in range(v0, v1, BLOCK_V):
            vs = v + tl.arange(0, BLOCK_V)
            vmask = vs < v1
            wq = _to_dot(tl.load(w_base + vs.to(tl.int64)[:, None] * H + hc[None, :],
                                 mask=vmask[:, None] & hmask[None, :], other=0.0), DOT, UPCAST)
            if BLOCK_K == BLOCK_H:
                z = _mm(hq, tl.trans(wq), DOT, UPCAST, TF32)
            else:
                z = _logits_k(h_ptr, w_base, rows, rmask, vs, vmask, H, DOT, UPCAST, TF32, BLOCK_M, BLOCK_V, BLOCK_K)
            if HAS_BIAS:
                z += tl.load(b_ptr + vs0 + vs, mask=vmask, other=0.0)[None, :]
            p = tl.exp(z - lse[:, None]) * a[:, None]  # dz's dense part, [BLOCK_M, BLOCK_V]
            p = tl.where(rmask[:, None] & vmask[None, :], p, 0.0)
            dh += _mm(_to_dot(p, DOT, UPCAST), wq, DOT, UPCAST, TF32)
    if v0 == 0:  # the sparse label part: dz_{m,y} -= lg_m for every label occurrence
        lo = lab_offs_ptr + head.to(tl.int64) * (M + 1) + rows
        l0 = tl.load(lo, mask=rmask, other=0)
        cnt = tl.load(lo + 1, mask=rmask, other=0) - l0
        lg = tl.load(lg_ptr + hm, mask=rmask, other=0.0)
        if BLOCK_K == BLOCK_H:
            h32 = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :], mask=m2, other=0.0), DOT,
                          UPCAST).to(tl.float32)
        for j in range(0, fmax(cnt, 0)):
            live = rmask & (j < cnt)
            y = tl.load(lab_ids_ptr + l0 + j, mask=live, other=0).to(tl.int64)
            lm = live[:, None] & hmask[None, :]
            c = tl.where(live, lg, 0.0)
            if NEED_DH:
                wy = tl.load(w_base + y[:, None] * H + hc[None, :], mask=lm, other=0.0)
                dh -= c[:, None] * _to_dot(wy, DOT, UPCAST).to(tl.float32)
            if NEED_DW:
                if BLOCK_K == BLOCK_H:
                    tl.atomic_add(dw_ptr + (vs0 + y)[:, None] * H + hc[None, :], -c[:, None] * h32, mask=lm,
                                  sem="relaxed")
                else:  # wide H: the label rows' dWeight in BLOCK_K columns (bounded registers)
                    for k0 in range(0, H, BLOCK_K):
                        kc = k0 + tl.arange(0, BLOCK_K)
                        km = live[:, None] & (kc < H)[None, :]
                        hk = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + kc[None, :], mask=km,
                                             other=0.0), DOT, UPCAST).to(tl.float32)
                        tl.atomic_add(dw_ptr + (vs0 + y)[:, None] * H + kc[None, :], -c[:, None] * hk, mask=km,
                                      sem="relaxed")
            if NEED_DB:
                tl.atomic_add(db_ptr + vs0 + y, -c, mask=live, sem="relaxed")
    if NEED_DH:
        tl.atomic_add(dh_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :], dh, mask=m2, sem="relaxed")


@jit(do_not_specialize=["M"])
def _ce_bwd_dw_kernel(
    dw_ptr,  # fp32 [sum_k V_k, H] flat dWeight: holds pass 1's label part; this adds the dense part (NEED_DW)
    db_ptr,  # fp32 [sum_k V_k] flat dBias, likewise (NEED_DB)
    h_ptr, w_ptrs, b_ptr, vstart_ptr,  # as in the forward
    tile_head_ptr, tile_v0_ptr,  # int32 [n_tiles] the vocabulary tiles (never straddling two heads)
    head_v_ptr,  # int32 [n_heads] V_k
    lse_ptr, a_ptr,  # fp32 [n_heads, M], as in pass 1
    M, H,
    W_DTYPE: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr, HAS_BIAS: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    head = tl.load(tile_head_ptr + t)
    vs = tl.load(tile_v0_ptr + t) + tl.arange(0, BLOCK_V)
    vmask = vs < tl.load(head_v_ptr + head)
    hc = tl.arange(0, BLOCK_H)
    hmask = hc < H
    wm = vmask[:, None] & hmask[None, :]
    w_base = tl.load(w_ptrs + head).to(tl.pointer_type(W_DTYPE))
    vs0 = tl.load(vstart_ptr + head)
    if BLOCK_K == BLOCK_H:
        wq = _to_dot(tl.load(w_base + vs.to(tl.int64)[:, None] * H + hc[None, :], mask=wm, other=0.0), DOT,
                     UPCAST)  # [BLOCK_V, BLOCK_H], resident
    if HAS_BIAS:
        b = tl.load(b_ptr + vs0 + vs, mask=vmask, other=0.0)
    dw = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        hq = _to_dot(tl.load(h_ptr + rows.to(tl.int64)[:, None] * H + hc[None, :],
                             mask=rmask[:, None] & hmask[None, :], other=0.0), DOT, UPCAST)
        hm = head.to(tl.int64) * M + rows
        lse = tl.load(lse_ptr + hm, mask=rmask, other=0.0)
        a = tl.load(a_ptr + hm, mask=rmask, other=0.0)
        if BLOCK_K == BLOCK_H:
            z = _mm(hq, tl.trans(wq), DOT, UPCAST, TF32)
        else:
            z = _logits_k(h_ptr, w_base, rows, rmask, vs, vmask, H, DOT, UPCAST, TF32, BLOCK_M, BLOCK_V, BLOCK_K)
        if HAS_BIAS:
            z += b[None, :]
        p = tl.exp(z - lse[:, None]) * a[:, None]
        p = tl.where(rmask[:, None] & vmask[None, :], p, 0.0)
        if NEED_DW:
            dw += _mm(tl.trans(_to_dot(p, DOT, UPCAST)), hq, DOT, UPCAST, TF32)
        if NEED_DB:
            db += fsum(p, 0)
    # Each tile has exactly one owner here, and pass 1 (the label atomics) finished before this
    # launch: a plain read-add-write is race-free.
    rowv = (vs0 + vs).to(tl.int64)
    if NEED_DW:
        ptrs = dw_ptr + rowv[:, None] * H + hc[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=wm, other=0.0) + dw, mask=wm)
    if NEED_DB:
        tl.store(db_ptr + rowv, tl.load(db_ptr + rowv, mask=vmask, other=0.0) + db, mask=vmask)


# ----------------------------------------------------------------------------------------------
# 3. Launchers (validate shape, dtype, contiguity; launch)
# ----------------------------------------------------------------------------------------------

# Block-size overrides (None: the heuristics in _blocks).  Tests shrink them to cover several row
# blocks, chunks and tiles; benchmarks/gpu_check.py may sweep them.  Pass 1 (dHidden) and pass 2
# (dWeight) have their own warps and stages (num_warps1/2, num_stages1/2); num_warps / num_stages
# override all three passes.
CONFIG: dict[str, int | None] = {"block_m": None, "block_v": None, "v_chunk": None, "block_m1": None,
                                 "block_v1": None, "block_m2": None, "block_v2": None, "block_k": None,
                                 "num_warps": None, "num_stages": None}

_ELT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _stages(per_stage: int, fixed: int, props, most: int = 3) -> int:
    """Software-pipeline depth: as many stages of ``per_stage`` bytes (the streamed tile) as fit the
    target's shared memory per block next to ``fixed`` bytes (resident operands, scratch), 1..most."""
    room = props.shared_per_block - fixed
    return max(1, min(most, room // max(per_stage, 1)))


def _blocks(M: int, H: int, w_dtype: torch.dtype = torch.float32, dot_dtype: torch.dtype = torch.float32,
            tf32: bool = False, props=None) -> dict[str, int]:
    """Tiles, warps and stages of the three passes, per dtype and per target (``props``:
    kernels.targets.GPUProps of the launch's device; None under the interpreter)."""
    block_h = max(16, next_pow2(H))
    if block_h > 512:
        # H = 1024 compiles, but pass 1 (the [rows, H] fp32 dHidden accumulator beside the label
        # terms) spills 44-72 B at 255 registers on sm_80 / sm_90 even at 16 x 16 tiles
        # (benchmarks/compile_gate.py); impl="auto" takes the torch path there.
        raise ValueError(f"{OP}: the Triton kernel keeps [rows, H] fp32 accumulators in registers and supports "
                         f"H <= 512, got H = {H}; use impl='torch'")
    if interpreting() or props is None:
        # ~2 ms per program and ~0.1 ms per tl op whatever its size: few programs, wide tiles (numpy
        # does the tile math).
        block_m = min(128, max(16, next_pow2(M)))
        cfg = {"block_m": block_m, "block_v": 1024, "v_chunk": 8192, "block_m1": block_m, "block_v1": 1024,
               "block_m2": block_m, "block_v2": 2048, "block_k": block_h, "num_warps": 4, "num_stages": 1}
        for p in "12":
            cfg[f"num_warps{p}"], cfg[f"num_stages{p}"] = 4, 1
    elif dot_dtype != torch.float32 or tf32:
        # Tensor cores (mma on sm_80, wgmma on sm_90, tcgen05 on sm_100).  Up to H = 256 the row
        # block's hidden stays resident as an operand (BLOCK_K = H) and [BLOCK_V, H] weight tiles
        # stream through shared memory, as many stages deep as the target's shared memory allows.
        # Weights in another dtype than the operands (fp32 parameters under bf16 autocast) are
        # staged as they are and converted in registers: half the vocabulary tile.  Pass 1 holds a
        # second [rows, H] fp32 accumulator (dHidden) and the label atomics, pass 2 a resident
        # [BLOCK_V, H] weight tile and its [BLOCK_V, H] fp32 accumulator: both take 64 x 64 tiles
        # Before sm_90 (mma keeps both operands in registers, wgmma reads one from shared memory)
        # the row blocks are halved, and so are pass 2's for fp32 (TF32) operands; sm_100 takes 32
        # vocabulary columns per forward tile when the weights are converted.
        # Beyond H = 256 both operands stream in 64-column K chunks and the tiles shrink with H.
        we, de = _ELT[w_dtype], _ELT[dot_dtype]
        edge = max(16, min(128, 16384 // block_h))
        half = max(16, edge // 2)
        block_k = block_h if block_h <= 256 else 64
        hopper = props.capability >= 90
        quarter = max(16, edge // 4)
        narrow = we == de == 2  # 16-bit weights and operands: nothing converted or held as fp32
        cfg = {"block_m": edge if hopper and narrow else half,
               "block_v": edge if narrow else (half if props.capability < 100 else quarter),
               "block_m1": half if hopper else quarter, "block_v1": half,
               "block_m2": half if (hopper or we == de) and de == 2 else quarter, "block_v2": half,
               "block_k": block_k,
               "v_chunk": 4096,
               "num_warps": 8, "num_warps1": 8, "num_warps2": 8}
        bm, bv, bm1, bv1, bm2, bv2 = (cfg[k] for k in ("block_m", "block_v", "block_m1", "block_v1", "block_m2",
                                                         "block_v2"))
        # streamed bytes per stage, and what stays in shared memory beside them (resident operand,
        # the layout-conversion scratch of the [rows, BLOCK_V] fp32 tile)
        cfg["num_stages"] = _stages((bv + bm) * block_k * we if block_k < block_h else bv * block_h * we,
                                    bm * block_h * de + bm * bv * 4, props)
        cfg["num_stages1"] = _stages(bv1 * block_h * we, bm1 * block_h * de + bm1 * bv1 * 4, props)
        cfg["num_stages2"] = _stages(bm2 * block_h * 4, bv2 * block_h * de + bm2 * bv2 * 4, props)
    elif block_h > 256:
        raise ValueError(f"{OP}: ieee fp32 (TF32 off) runs on CUDA-core FMA dots, whose [rows, H] operands "
                         f"spill beyond H = 256, got H = {H}; use impl='torch', TF32 or bf16 autocast")
    else:
        # ieee fp32 (TF32 off, torch's default): CUDA-core FMA dots.  An FMA dot holds, per thread, its
        # rows and columns of both operands over the whole K, so the logits stream over H in
        # BLOCK_K = 16 columns, every tile is small and 8 warps share it: 64 x 32 (forward),
        # 32 rows x 16 vocabulary with a [32, H] accumulator (pass 1), 32 vocabulary x 16 rows with a
        # [32, H] accumulator (pass 2).
        cfg = {"block_m": 64, "block_v": 32, "block_m1": 32, "block_v1": 16, "block_m2": 16, "block_v2": 32,
               "block_k": 16, "v_chunk": 4096, "num_warps": 8, "num_warps1": 8, "num_warps2": 8,
               "num_stages": 2, "num_stages1": 2, "num_stages2": 2}
    cfg.update({k: v for k, v in CONFIG.items() if v is not None})
    if CONFIG["block_v"] is not None and CONFIG["block_v1"] is None:
        cfg["block_v1"] = CONFIG["block_v"]  # pass 1 walks the forward's chunks
    for p in "12":
        for k in ("num_warps", "num_stages"):
            if CONFIG[k] is not None:
                cfg[f"{k}{p}"] = CONFIG[k]
    cfg["block_h"] = block_h
    cfg["block_k"] = min(cfg["block_k"], block_h)
    cfg["v_chunk"] = max(cfg["block_v"], cfg["v_chunk"] // cfg["block_v"] * cfg["block_v"])
    return cfg


@functools.lru_cache(maxsize=64)
def _schedule(vocabs: tuple[int, ...], v_chunk: int, block_v2: int, device: torch.device) -> dict:
    """Work items (forward, pass 1) and vocabulary tiles (pass 2) of one head layout."""
    item_head, item_v0, item_v1, item_slot, tile_head, tile_v0, vstart = [], [], [], [], [], [], []
    max_items = max(cdiv(v, v_chunk) for v in vocabs)
    off = 0
    for k, v in enumerate(vocabs):
        for j, v0 in enumerate(range(0, v, v_chunk)):
            item_head.append(k)
            item_v0.append(v0)
            item_v1.append(min(v, v0 + v_chunk))
            item_slot.append(k * max_items + j)
        for v0 in range(0, v, block_v2):
            tile_head.append(k)
            tile_v0.append(v0)
        vstart.append(off)
        off += v
    i32, i64 = torch.int32, torch.int64
    return {
        "item_head": int_array(item_head, i32, device), "item_v0": int_array(item_v0, i32, device),
        "item_v1": int_array(item_v1, i32, device), "item_slot": int_array(item_slot, i32, device),
        "tile_head": int_array(tile_head, i32, device), "tile_v0": int_array(tile_v0, i32, device),
        "vstart": int_array(vstart, i64, device), "head_v": int_array(vocabs, i32, device),
        "n_items": len(item_head), "n_tiles": len(tile_head), "max_items": max_items, "total_v": off,
    }


def dot_dtype_for(hidden: torch.Tensor, weights: list[torch.Tensor]) -> torch.dtype:
    """The matmul operand dtype: autocast's when autocast is on for the device (what F.linear would
    use), else the promoted input dtype."""
    dev = launch_device_type(hidden.device)
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weights[0].dtype)


def _tf32(device: torch.device) -> bool:
    return is_gpu(device) and torch.backends.cuda.matmul.allow_tf32 and not interpreting()


class _Prep:
    """What both passes need, from the user's per-head lists (a handful of small torch ops)."""

    def __init__(self, hidden, weights, biases, label_offsets, label_ids, normalize):
        self.n_heads = len(weights)
        if not (len(biases) == len(label_offsets) == len(label_ids) == self.n_heads) or self.n_heads == 0:
            raise ValueError(f"{OP}: expected one weight, bias, label_offsets and label_ids per head (>= 1 head), "
                             f"got {self.n_heads}, {len(biases)}, {len(label_offsets)}, {len(label_ids)}")
        dtype, device = weights[0].dtype, hidden.device
        for k in range(self.n_heads):
            _check_inputs(hidden, weights[k], biases[k], label_offsets[k], label_ids[k])
            if weights[k].dtype != dtype:
                raise TypeError(f"{OP}: weights[{k}] is {weights[k].dtype}, weights[0] {dtype}; one dtype per call")
            for name, t in (("weights", weights[k]), ("biases", biases[k]), ("label_offsets", label_offsets[k]),
                            ("label_ids", label_ids[k])):
                if t is not None and t.device != device:
                    raise ValueError(f"{OP}: {name}[{k}] is on {t.device}, hidden on {device}")
        self.M, self.H = hidden.shape
        self.hidden = hidden.contiguous()
        self.weights = [w.contiguous() for w in weights]
        self.vocabs = tuple(int(w.shape[0]) for w in weights)
        self.has_bias = [b is not None for b in biases]
        self.cfg = None  # per dot dtype: see blocks()
        self.sched = None
        self.bias = (torch.cat([b.float() if b is not None else torch.zeros(v, device=device)
                                for b, v in zip(biases, self.vocabs)]) if any(self.has_bias) else None)
        nnz = [int(ids.shape[0]) for ids in label_ids]
        base = [sum(nnz[:k]) for k in range(self.n_heads)]  # head k's first label (host ints: no copy, no sync)
        self.lab_offs = torch.stack([o.long() + b for o, b in zip(label_offsets, base)])  # int64 [n_heads, M+1]
        self.lab_ids = torch.cat([i.to(torch.int32) for i in label_ids]) if sum(nnz) else \
            torch.zeros(1, dtype=torch.int32, device=device)
        self.counts = (self.lab_offs[:, 1:] - self.lab_offs[:, :-1]).float()  # [n_heads, M]
        self.normalize = bool(normalize)

    def blocks(self, dot_dtype: torch.dtype) -> dict:
        if self.cfg is None:
            device = self.hidden.device
            self.cfg = _blocks(self.M, self.H, self.weights[0].dtype, dot_dtype, _tf32(device), gpu_props(device))
            self.sched = _schedule(self.vocabs, self.cfg["v_chunk"], self.cfg["block_v2"], device)
        return self.cfg

    def coef_and_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """coef [n_heads, M] of logsumexp in the loss, and each label's weight w [n_heads, M]."""
        if self.normalize:
            return (self.counts > 0).float(), 1.0 / self.counts.clamp(min=1.0)
        return self.counts, torch.ones_like(self.counts)

    def consts(self, dot_dtype: torch.dtype) -> dict:
        return {"W_DTYPE": tl_dtype(self.weights[0].dtype), "DOT": tl_dtype(dot_dtype), "UPCAST": interpreting(),
                "TF32": _tf32(self.hidden.device), "HAS_BIAS": self.bias is not None}


def _forward_triton(hidden, weights, biases, label_offsets, label_ids, normalize: bool,
                    dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head, per-row losses and log-sum-exps, both fp32 ``[n_heads, M]``."""
    pr = _Prep(hidden, weights, biases, label_offsets, label_ids, normalize)
    cfg = pr.blocks(dot_dtype)
    n, M, s = pr.n_heads, pr.M, pr.sched
    device = hidden.device
    if M == 0:
        empty = torch.zeros(n, 0, dtype=torch.float32, device=device)
        return empty, empty.clone()
    part = torch.full((n * s["max_items"], M), float("-inf"), dtype=torch.float32, device=device)
    zlab = torch.empty(n, M, dtype=torch.float32, device=device)
    _ce_fwd_kernel[(cdiv(M, cfg["block_m"]), s["n_items"])](
        part, zlab, pr.hidden, ptr_array(pr.weights), pr.bias if pr.bias is not None else zlab, s["vstart"],
        s["item_head"], s["item_v0"], s["item_v1"], s["item_slot"], pr.lab_offs, pr.lab_ids, M, pr.H,
        **pr.consts(dot_dtype), NORMALIZE=pr.normalize,
        BLOCK_M=cfg["block_m"], BLOCK_V=cfg["block_v"], BLOCK_H=cfg["block_h"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lse = torch.logsumexp(part.view(n, s["max_items"], M), dim=1)  # [n_heads, M]: combine the chunks
    coef, _ = pr.coef_and_weight()
    return coef * lse - zlab, lse


def _backward_triton(grad_loss, hidden, weights, biases, label_offsets, label_ids, lse, normalize: bool,
                     dot_dtype: torch.dtype, need_h: bool, need_w: bool, need_b: bool):
    """(dHidden or None, [dWeight_k] or None, [dBias_k or None] or None) for ``grad_loss [n_heads, M]``."""
    pr = _Prep(hidden, weights, biases, label_offsets, label_ids, normalize)
    cfg = pr.blocks(dot_dtype)
    n, M, H, s = pr.n_heads, pr.M, pr.H, pr.sched
    device = hidden.device
    need_b = need_b and pr.bias is not None
    dh = torch.zeros(M, H, dtype=torch.float32, device=device) if need_h else None
    dw = torch.zeros(s["total_v"], H, dtype=torch.float32, device=device) if need_w else None
    db = torch.zeros(s["total_v"], dtype=torch.float32, device=device) if need_b else None
    if M and (need_h or need_w or need_b):
        coef, wgt = pr.coef_and_weight()
        g = grad_loss.float()
        a, lg = (g * coef).contiguous(), (g * wgt).contiguous()  # [n_heads, M]
        lse = lse.contiguous()
        wptrs, dummy = ptr_array(pr.weights), lse
        consts = pr.consts(dot_dtype)
        bias = pr.bias if pr.bias is not None else dummy
        _ce_bwd_dh_kernel[(cdiv(M, cfg["block_m1"]), s["n_items"])](
            dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
            pr.hidden, wptrs, bias, s["vstart"], s["item_head"], s["item_v0"], s["item_v1"],
            lse, a, lg, pr.lab_offs, pr.lab_ids, M, H, **consts,
            NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b,
            BLOCK_M=cfg["block_m1"], BLOCK_V=cfg["block_v1"], BLOCK_H=cfg["block_h"], BLOCK_K=cfg["block_k"],
            num_warps=cfg["num_warps1"], num_stages=cfg["num_stages1"],
        )
        if need_w or need_b:
            _ce_bwd_dw_kernel[(s["n_tiles"],)](
                dw if need_w else dummy, db if need_b else dummy, pr.hidden, wptrs, bias, s["vstart"],
                s["tile_head"], s["tile_v0"], s["head_v"], lse, a, M, H, **consts,
                NEED_DW=need_w, NEED_DB=need_b,
                BLOCK_M=cfg["block_m2"], BLOCK_V=cfg["block_v2"], BLOCK_H=cfg["block_h"], BLOCK_K=cfg["block_k"],
                num_warps=cfg["num_warps2"], num_stages=cfg["num_stages2"],
            )
    starts = [0]
    for v in pr.vocabs:
        starts.append(starts[-1] + v)
    dws = [dw[starts[k]:starts[k + 1]].to(weights[k].dtype) for k in range(n)] if need_w else None
    dbs = ([db[starts[k]:starts[k + 1]].to(biases[k].dtype) if pr.has_bias[k] else None for k in range(n)]
           if need_b else None)
    return (dh.to(hidden.dtype) if need_h else None), dws, dbs


# ----------------------------------------------------------------------------------------------
# 4. autograd.Function (eager) and torch.library op (torch.compile); both only call the launchers
# ----------------------------------------------------------------------------------------------


class _MultiLabelCETriton(torch.autograd.Function):
    """Inputs flattened: hidden, then n weights, n biases (None allowed), n label_offsets, n label_ids."""

    @staticmethod
    def forward(ctx, normalize: bool, dot_dtype: torch.dtype, n: int, hidden, *flat):
        weights, biases, offs, ids = (list(flat[i * n:(i + 1) * n]) for i in range(4))
        loss, lse = _forward_triton(hidden, weights, biases, offs, ids, normalize, dot_dtype)
        ctx.save_for_backward(hidden, lse, *weights, *[b for b in biases if b is not None], *offs, *ids)
        ctx.meta = (normalize, dot_dtype, n, [b is not None for b in biases])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        normalize, dot_dtype, n, has_bias = ctx.meta
        hidden, lse, *rest = ctx.saved_tensors
        weights, rest = rest[:n], rest[n:]
        nb = sum(has_bias)
        it = iter(rest[:nb])
        biases = [next(it) if hb else None for hb in has_bias]
        offs, ids = rest[nb:nb + n], rest[nb + n:]
        need = ctx.needs_input_grad
        need_h, need_w, need_b = need[3], any(need[4:4 + n]), any(need[4 + n:4 + 2 * n])
        dh, dws, dbs = _backward_triton(grad_loss, hidden, weights, biases, offs, ids, lse, normalize, dot_dtype,
                                        need_h, need_w, need_b)
        dws = dws if dws is not None else [None] * n
        dbs = dbs if dbs is not None else [None] * n
        return (None, None, None, dh, *dws, *dbs, *([None] * (2 * n)))


if tl is not None:
    Tensor = torch.Tensor
    # Biases travel as the list of present ones plus one flag per head: register_autograd treats a
    # Tensor?[] input as a single non-differentiable leaf, so its tensors would get no gradient.

    def _unflatten_biases(present, has_bias):
        it = iter(present)
        return [next(it) if hb else None for hb in has_bias]

    @torch.library.custom_op("userbert::multi_label_softmax_ce", mutates_args=())
    def _ce_op(hidden: Tensor, weights: list[Tensor], biases: list[Tensor], has_bias: list[bool],
               label_offsets: list[Tensor], label_ids: list[Tensor], normalize: bool,
               dot_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return _forward_triton(hidden, weights, _unflatten_biases(biases, has_bias), label_offsets, label_ids,
                               normalize, dot_dtype)

    @_ce_op.register_fake
    def _(hidden, weights, biases, has_bias, label_offsets, label_ids, normalize, dot_dtype):
        out = hidden.new_empty(len(weights), hidden.shape[0], dtype=torch.float32)
        return out, torch.empty_like(out)

    @torch.library.custom_op("userbert::multi_label_softmax_ce_backward", mutates_args=())
    def _ce_bwd_op(grad_loss: Tensor, hidden: Tensor, weights: list[Tensor], biases: list[Tensor],
                   has_bias: list[bool], label_offsets: list[Tensor], label_ids: list[Tensor], lse: Tensor,
                   normalize: bool, dot_dtype: torch.dtype) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        dh, dws, dbs = _backward_triton(grad_loss, hidden, weights, _unflatten_biases(biases, has_bias),
                                        label_offsets, label_ids, lse, normalize, dot_dtype, True, True, True)
        # fp32 gradients are views of one flat buffer; a custom op's outputs may not alias each other
        own = lambda t: t.clone() if t._base is not None else t
        return own(dh), [own(d) for d in dws], [own(d) for d in (dbs or []) if d is not None]

    @_ce_bwd_op.register_fake
    def _(grad_loss, hidden, weights, biases, has_bias, label_offsets, label_ids, lse, normalize, dot_dtype):
        return torch.empty_like(hidden), [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]

    def _ce_setup_context(ctx, inputs, output):
        hidden, weights, biases, has_bias, label_offsets, label_ids, normalize, dot_dtype = inputs
        ctx.save_for_backward(hidden, output[1], *weights, *biases, *label_offsets, *label_ids)
        ctx.meta = (normalize, dot_dtype, len(weights), len(biases), list(has_bias))

    def _ce_op_backward(ctx, grad_loss, _grad_lse):
        normalize, dot_dtype, n, nb, has_bias = ctx.meta
        hidden, lse, *rest = ctx.saved_tensors
        weights, biases, offs, ids = rest[:n], rest[n:n + nb], rest[n + nb:2 * n + nb], rest[2 * n + nb:]
        dh, dws, dbs = torch.ops.userbert.multi_label_softmax_ce_backward(grad_loss, hidden, weights, biases,
                                                                          has_bias, offs, ids, lse, normalize,
                                                                          dot_dtype)
        return dh, list(dws), list(dbs), None, [None] * n, [None] * n, None, None

    _ce_op.register_autograd(_ce_op_backward, setup_context=_ce_setup_context)
    register_triton(OP)


# ----------------------------------------------------------------------------------------------
# 5. Public functions
# ----------------------------------------------------------------------------------------------


def _grouped_triton(hidden, weights, biases, label_offsets, label_ids, normalize) -> torch.Tensor:
    dot = dot_dtype_for(hidden, weights)
    if torch.compiler.is_compiling():
        return torch.ops.userbert.multi_label_softmax_ce(hidden, list(weights), [b for b in biases if b is not None],
                                                         [b is not None for b in biases], list(label_offsets),
                                                         list(label_ids), bool(normalize), dot)[0]
    n = len(weights)
    return _MultiLabelCETriton.apply(bool(normalize), dot, n, hidden, *weights, *biases, *label_offsets, *label_ids)


def _triton_supports(hidden: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether the Triton kernels take this H and dtype on this device (_blocks raises otherwise):
    ``impl="auto"`` then takes the torch path, ``impl="triton"`` raises _blocks' error."""
    try:
        _blocks(1, hidden.shape[-1], weights[0].dtype, dot_dtype_for(hidden, weights), _tf32(hidden.device),
                gpu_props(hidden.device))
    except ValueError:
        return False
    return True


def multi_label_softmax_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           label_offsets: torch.Tensor, label_ids: torch.Tensor, normalize: bool = True, *,
                           impl: str = "auto") -> torch.Tensor:
    """Per-row multi-label softmax cross entropy, fp32 ``[M]`` (see the module docstring)."""
    if resolve_impl(impl, hidden, weight, bias, label_offsets, label_ids, op=OP) == "triton" and (
            impl != "auto" or _triton_supports(hidden, [weight])):
        return _grouped_triton(hidden, [weight], [bias], [label_offsets], [label_ids], normalize)[0]
    return multi_label_softmax_ce_reference(hidden, weight, bias, label_offsets, label_ids, normalize)


def multi_label_softmax_ce_grouped(hidden: torch.Tensor, weights: list[torch.Tensor],
                                   biases: list[torch.Tensor | None] | None,
                                   label_offsets: list[torch.Tensor], label_ids: list[torch.Tensor],
                                   normalize: bool = True, *, impl: str = "auto") -> torch.Tensor:
    """Every head of one segment on the same rows: per-head, per-row losses, fp32 ``[n_heads, M]``.

    Head k has ``weights[k]`` ``[V_k, H]`` (one dtype for all heads), ``biases[k]`` ``[V_k]`` or None, and
    its own label CSR (``label_offsets[k]`` ``[M + 1]``, ``label_ids[k]``).  Per-row losses (not sums)
    are returned so that callers can sum per head for statistics, over heads for the loss, or weight
    rows; ``out.sum()`` is the segment's total loss.  The torch path loops over heads; the Triton
    path runs every head in one launch per pass (forward: 1, backward: 2).
    """
    n_heads = len(weights)
    biases = list(biases) if biases is not None else [None] * n_heads
    if not (len(biases) == len(label_offsets) == len(label_ids) == n_heads) or n_heads == 0:
        raise ValueError(f"{OP}_grouped: expected one weight, bias, label_offsets and label_ids per head "
                         f"(>= 1 head), got {n_heads}, {len(biases)}, {len(label_offsets)}, {len(label_ids)}")
    if resolve_impl(impl, hidden, weights, biases, label_offsets, label_ids, op=OP) == "triton" and (
            impl != "auto" or _triton_supports(hidden, weights)):
        return _grouped_triton(hidden, weights, biases, label_offsets, label_ids, normalize)
    rows = [multi_label_softmax_ce_reference(hidden, weights[k], biases[k], label_offsets[k], label_ids[k], normalize)
            for k in range(n_heads)]
    return torch.stack(rows)  # [n_heads, M]
