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

File order (DESIGN.md §5): torch reference → Triton kernels → launchers → autograd.Function →
public function.  The Triton parts are a later issue; their sections below say what goes there.
"""

from __future__ import annotations

import torch

from kernels.dispatch import TritonNotImplementedError, resolve_impl

OP = "multi_label_softmax_ce"
_NOT_YET = f"{OP}: the Triton kernel is not implemented yet; use impl='torch' or impl='auto'"

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
# 2. Triton kernels (later issue)
#    - forward: a block of rows resident, stream vocab tiles of weight through tl.dot, online
#      log-sum-exp (Cut Cross-Entropy); the label logits as a sparse gather.
#    - backward: recompute each tile's logits, dz = a * softmax - labels, accumulate dHidden and
#      dWeight/dBias tile by tile (fp32 accumulation).
#    - grouped: one launch over every head of a segment (a per-program head index into packed
#      weights), vocabularies of very different sizes.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# 3. Launchers (validate shape, dtype, contiguity; launch)
# ----------------------------------------------------------------------------------------------


def _forward_triton(hidden, weight, bias, label_offsets, label_ids, normalize):
    raise TritonNotImplementedError(_NOT_YET)


def _backward_triton(grad_loss, hidden, weight, bias, label_offsets, label_ids, lse, normalize):
    raise TritonNotImplementedError(_NOT_YET)


# ----------------------------------------------------------------------------------------------
# 4. autograd.Function (only saves tensors and calls the launchers)
# ----------------------------------------------------------------------------------------------


class _MultiLabelCETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, label_offsets, label_ids, normalize):
        loss, lse = _forward_triton(hidden, weight, bias, label_offsets, label_ids, normalize)
        ctx.save_for_backward(hidden, weight, bias, label_offsets, label_ids, lse)
        ctx.normalize = normalize
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, label_offsets, label_ids, lse = ctx.saved_tensors
        dh, dw, db = _backward_triton(grad_loss, hidden, weight, bias, label_offsets, label_ids, lse,
                                      ctx.normalize)
        return dh, dw, db, None, None, None


# ----------------------------------------------------------------------------------------------
# 5. Public functions
# ----------------------------------------------------------------------------------------------


def multi_label_softmax_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           label_offsets: torch.Tensor, label_ids: torch.Tensor, normalize: bool = True, *,
                           impl: str = "auto") -> torch.Tensor:
    """Per-row multi-label softmax cross entropy, fp32 ``[M]`` (see the module docstring)."""
    if resolve_impl(impl, hidden, weight, bias, label_offsets, label_ids, op=OP) == "triton":
        _check_inputs(hidden, weight, bias, label_offsets, label_ids)
        return _MultiLabelCETriton.apply(hidden, weight, bias, label_offsets, label_ids, bool(normalize))
    return multi_label_softmax_ce_reference(hidden, weight, bias, label_offsets, label_ids, normalize)


def multi_label_softmax_ce_grouped(hidden: torch.Tensor, weights: list[torch.Tensor],
                                   biases: list[torch.Tensor | None] | None,
                                   label_offsets: list[torch.Tensor], label_ids: list[torch.Tensor],
                                   normalize: bool = True, *, impl: str = "auto") -> torch.Tensor:
    """Every head of one segment on the same rows: per-head, per-row losses, fp32 ``[n_heads, M]``.

    Head k has ``weights[k]`` ``[V_k, H]``, ``biases[k]`` ``[V_k]`` or None, and its own label CSR
    (``label_offsets[k]`` ``[M + 1]``, ``label_ids[k]``).  Per-row losses (not sums) are returned so
    that callers can sum per head for statistics, over heads for the loss, or weight rows; the sum
    ``out.sum()`` is the segment's total loss.  The torch path loops over heads; the Triton path
    (later) runs them in one launch.
    """
    n_heads = len(weights)
    biases = list(biases) if biases is not None else [None] * n_heads
    if not (len(biases) == len(label_offsets) == len(label_ids) == n_heads) or n_heads == 0:
        raise ValueError(f"{OP}_grouped: expected one weight, bias, label_offsets and label_ids per head "
                         f"(>= 1 head), got {n_heads}, {len(biases)}, {len(label_offsets)}, {len(label_ids)}")
    rows = [multi_label_softmax_ce(hidden, weights[k], biases[k], label_offsets[k], label_ids[k], normalize,
                                   impl=impl) for k in range(n_heads)]
    return torch.stack(rows)  # [n_heads, M]
