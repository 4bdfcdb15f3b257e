"""gather_concat_mean: a behavioural word's token vector from its actions' attribute embeddings.

For word w with actions a in [word_offsets[w], word_offsets[w+1]) and K attribute tables::

    out[w] = concat_k( mean_a tables[k][attr_ids[a, k]] )        # [sum_k D_k]

Semantics (every implementation follows these):

- An empty word (no actions) gives a zero row.
- Padding: id 0 contributes a zero vector whatever ``tables[k][0]`` holds, and still counts in the
  mean's denominator (the mean is over the word's actions, not over its non-padding ids), so a
  word's K slices always share one denominator.  Row 0 of every table gets no gradient.  Real data
  never carries id 0 (docs/FORMATS.md §3); the rule just makes the op well-defined.
- bf16/fp16 tables accumulate in fp32, forward and backward; the output has the tables' dtype
  (promoted with the dtypes of the fused extras below, when given).

Fusions (constexpr flags in the Triton kernel, plain torch in the reference path), applied in this
order so that the output row is written once instead of three times:

    out[w] = (0 if zero_mask[w] else out[w]) + add[w] + pos_table[word_pos[w]] + seg_vec

Backward variants of the Triton path (``backward=``), both accumulating grad/count in fp32:

- ``"atomic"``: every (action, attribute) pair atomically adds its row of grad/count into the
  table's fp32 gradient.  No preprocessing; hot (Zipf) rows serialise on their atomics.
- ``"sorted"``: the (table, id) keys of all pairs are sorted (one torch.sort), each program reduces
  a run of BLOCK_E sorted pairs with a 0/1 segment matrix on tl.dot, and only the first pair of each
  run in the block writes, so a row receives one atomic per block it spans instead of one per use.

File order (as in Liger-Kernel and Cut Cross-Entropy): torch reference → Triton kernels → launchers →
autograd.Function / torch.library op → public function.  User docs: docs/KERNELS.md.
"""

import functools

import torch
import torch.nn.functional as F

from kernels._triton_utils import cdiv, fmax, int_array, interpreting, jit, next_pow2, ptr_array, tl, tl_dtype
from kernels.dispatch import register_triton, resolve_impl

OP = "gather_concat_mean"
BACKWARD_VARIANTS = ("atomic", "sorted")
# The backward the Triton path uses when none is named.  "atomic" until a GPU measurement says
# otherwise (benchmarks/gpu_check.py times both at the paper's sizes).
DEFAULT_BACKWARD = "atomic"


# ----------------------------------------------------------------------------------------------
# 1. Torch reference (also the CPU production path)
# ----------------------------------------------------------------------------------------------


def _check_inputs(tables: list[torch.Tensor], attr_ids: torch.Tensor, word_offsets: torch.Tensor) -> None:
    if len(tables) == 0:
        raise ValueError(f"{OP}: expected at least one table")
    if attr_ids.dim() != 2 or attr_ids.shape[1] != len(tables):
        raise ValueError(f"{OP}: attr_ids must be [n_actions, K={len(tables)}], got {list(attr_ids.shape)}")
    index_dtypes = (torch.int32, torch.int64)
    if attr_ids.dtype not in index_dtypes or word_offsets.dtype not in index_dtypes:
        raise TypeError(f"{OP}: attr_ids and word_offsets must be int32 or int64, "
                        f"got {attr_ids.dtype} and {word_offsets.dtype}")
    if word_offsets.dim() != 1 or word_offsets.numel() < 1:
        raise ValueError(f"{OP}: word_offsets must be [n_words + 1], got {list(word_offsets.shape)}")
    dtype, device = tables[0].dtype, tables[0].device
    for k, t in enumerate(tables):
        if t.dim() != 2:
            raise ValueError(f"{OP}: tables[{k}] must be [V_k, D_k], got {list(t.shape)}")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"{OP}: tables[{k}] is {t.dtype} on {t.device}, tables[0] is {dtype} on {device}")
    if word_offsets.device.type == "cpu" and (int(word_offsets[0]) != 0
                                              or int(word_offsets[-1]) != attr_ids.shape[0]):
        raise ValueError(f"{OP}: word_offsets must run from 0 to n_actions = {attr_ids.shape[0]}, got "
                         f"{int(word_offsets[0])} .. {int(word_offsets[-1])}")


class _GatherConcatMeanTorch(torch.autograd.Function):
    """Forward through ``F.embedding_bag`` (one fused gather + bag reduction per table, fp32
    accumulation inside); backward hand-written so that the scatter into the tables accumulates
    in fp32 even for bf16/fp16 tables (autograd's own embedding backward adds in the table dtype,
    which loses hot rows' gradients at Zipf-distributed shop ids).  Measured on 2 CPU cores at
    23k actions x 6 tables (D = 128): forward 1-3 ms against 8-16 ms for index_select +
    index_add_/segment_reduce, backward ~2x faster than autograd through embedding_bag."""

    @staticmethod
    def forward(ctx, attr_ids: torch.Tensor, word_offsets: torch.Tensor, *tables: torch.Tensor):
        ids_t = attr_ids.t().contiguous()  # [K, n_actions]: each attribute's ids contiguous for embedding_bag
        offsets = word_offsets.to(ids_t.dtype)  # embedding_bag wants ids and offsets of one dtype
        counts = (word_offsets[1:] - word_offsets[:-1]).to(torch.float32)  # [n_words] actions per word
        has_pad = (ids_t == 0).any(dim=1).tolist()  # per table: does padding id 0 occur at all?
        outs = []
        for k, table in enumerate(tables):
            if not has_pad[k]:
                # The common case: the plain mean, accumulated in fp32 by embedding_bag, rounded once.
                outs.append(F.embedding_bag(ids_t[k], table, offsets, mode="mean", include_last_offset=True))
            else:
                # Padding present: weight 0 drops id 0's row, and we divide by the full action count.
                keep = (ids_t[k] != 0).to(table.dtype)
                s = F.embedding_bag(ids_t[k], table, offsets, mode="sum", include_last_offset=True,
                                    per_sample_weights=keep)
                outs.append((s.float() / counts.clamp(min=1.0)[:, None]).to(table.dtype))
        ctx.save_for_backward(ids_t, word_offsets)
        ctx.table_shapes = [tuple(t.shape) for t in tables]
        return torch.cat(outs, dim=1)  # [n_words, sum_k D_k]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids_t, word_offsets = ctx.saved_tensors
        lengths = (word_offsets[1:] - word_offsets[:-1]).long()  # [n_words]
        n_words = lengths.shape[0]
        # Word of each action: actions are stored word after word (CSR), so this is a repeat.
        word_of_action = torch.repeat_interleave(torch.arange(n_words, device=lengths.device), lengths)
        g = grad_out.float() / lengths.clamp(min=1).float()[:, None]  # [n_words, D]: d out / d row = 1/count
        grads: list[torch.Tensor | None] = []
        col = 0
        for k, (vocab, dim) in enumerate(ctx.table_shapes):
            if not ctx.needs_input_grad[2 + k]:
                grads.append(None)
                col += dim
                continue
            g_actions = g[:, col:col + dim].index_select(0, word_of_action)  # [n_actions, D_k]
            col += dim
            # index_add_ with int64 ids is ~4x faster on CPU than with int32 ids (measured).
            gt = torch.zeros(vocab, dim, dtype=torch.float32, device=g.device)
            gt.index_add_(0, ids_t[k].long(), g_actions)
            gt[0] = 0  # padding receives no gradient
            grads.append(gt.to(grad_out.dtype))
        return (None, None, *grads)


def gather_concat_mean_reference(tables: list[torch.Tensor], attr_ids: torch.Tensor,
                                 word_offsets: torch.Tensor) -> torch.Tensor:
    """Torch reference: ``[n_words, sum_k D_k]`` in the tables' dtype (see the module docstring).

    tables: K tensors ``[V_k, D_k]`` (one dtype and device); attr_ids: int32 ``[n_actions, K]``;
    word_offsets: int32 ``[n_words + 1]``, the CSR of each word's actions.  Differentiable in the
    tables (not in the ids).  Tested against a float64 loop in tests/test_kernels_reference.py.
    """
    _check_inputs(tables, attr_ids, word_offsets)
    return _GatherConcatMeanTorch.apply(attr_ids, word_offsets, *tables)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# One [BLOCK_W words, BLOCK_D columns] tile covers every table at once: the output's D = sum_k D_k
# columns are described by column maps built once per table layout (launchers below):
#   col_tab[c]   the table k that column c belongs to
#   col_dim[c]   D_k, that table's row stride
#   col_in[c]    c's column inside table k         (forward: table base pointer from tab_ptrs[k])
#   col_goff[c]  flat offset of table k's gradient + col_in[c]   (backward: one flat fp32 buffer)
# Words are CSR rows of actions; a program loops j over the longest word of its block, so the
# gathers of BLOCK_W words are in flight together (the op is bound by the gathered bytes).
# ----------------------------------------------------------------------------------------------


@jit(do_not_specialize=["n_words"])
def _gcm_fwd_kernel(
    out_ptr,  # [n_words, D] output dtype, written once
    ids_ptr,  # int32/int64 [n_actions, K] attribute ids, row-major
    offs_ptr,  # int32/int64 [n_words + 1] CSR: actions of word w are rows offs[w]:offs[w+1]
    tab_ptrs,  # int64 [K] data_ptr of each table (TAB_DTYPE, contiguous [V_k, D_k])
    col_tab_ptr, col_dim_ptr, col_in_ptr,  # int32 [D] column maps (above)
    zero_ptr,  # uint8 [n_words] 1: the word's mean is zeroed (HAS_ZERO)
    add_ptr,  # [n_words, D] dense addend (HAS_ADD)
    pos_tab_ptr,  # [P, D] position table (HAS_POS)
    pos_ptr,  # int32/int64 [n_words] position id of each word (HAS_POS)
    seg_ptr,  # [D] segment vector (HAS_SEG)
    n_words, D, K,
    TAB_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_ADD: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr,
    VEC: tl.constexpr,  # every D_k and table base is a multiple of VEC elements (16 bytes): vector gathers
):
    words = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # [BLOCK_W]
    wmask = words < n_words
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    cmask = cols < D
    start = tl.load(offs_ptr + words, mask=wmask, other=0).to(tl.int64)
    count = tl.load(offs_ptr + words + 1, mask=wmask, other=0).to(tl.int64) - start
    active = wmask
    if HAS_ZERO:  # a zeroed word's actions are never read: the gathered bytes are the cost
        active = active & (tl.load(zero_ptr + words, mask=wmask, other=0) == 0)
    n_iter = fmax(tl.where(active, count, 0), 0)
    k = tl.load(col_tab_ptr + cols, mask=cmask, other=0)
    dk = tl.load(col_dim_ptr + cols, mask=cmask, other=0).to(tl.int64)
    ck = tl.load(col_in_ptr + cols, mask=cmask, other=0)
    base = tl.load(tab_ptrs + k).to(tl.pointer_type(TAB_DTYPE))  # [BLOCK_D] each column's table
    acc = tl.zeros([BLOCK_W, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_iter):
        m2 = (active & (j < count))[:, None] & cmask[None, :]
        # Every column loads its own table's id of action start + j: K distinct values per word, the
        # rest are L1 hits.
        ids = tl.load(ids_ptr + (start + j)[:, None] * K + k[None, :], mask=m2, other=0).to(tl.int64)
        ptrs = base[None, :] + ids * dk[None, :] + ck[None, :]
        if VEC > 1:  # runs of VEC columns lie in one table, one row: contiguous and 16-byte aligned
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, 16]), [1, VEC])
        # The mask stays per word and column (a per-id mask would keep the load scalar): padding id 0
        # reads row 0, which exists, and adds nothing but stays in the count.
        row = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
        acc += tl.where(ids != 0, row, 0.0)
    acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]  # empty words: 0 / 1
    m2 = wmask[:, None] & cmask[None, :]
    rows = words.to(tl.int64)[:, None] * D + cols[None, :]  # [BLOCK_W, BLOCK_D] flat output index
    if HAS_ADD:
        acc += tl.load(add_ptr + rows, mask=m2, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ptr + words, mask=wmask, other=0).to(tl.int64)
        acc += tl.load(pos_tab_ptr + pos[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_SEG:
        acc += tl.load(seg_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=m2)


@jit(do_not_specialize=["n_words"])
def _gcm_bwd_atomic_kernel(
    gflat_ptr,  # fp32 [sum_k V_k * D_k] every table's gradient, flat, zero-initialised
    gout_ptr,  # [n_words, D] upstream gradient
    ids_ptr,  # int32/int64 [n_actions, K]
    offs_ptr,  # int32/int64 [n_words + 1]
    col_tab_ptr, col_dim_ptr,  # int32 [D]
    col_goff_ptr,  # int64 [D]
    zero_ptr,  # uint8 [n_words] (HAS_ZERO): zeroed words pass no gradient to the tables
    n_words, D, K,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ZERO: tl.constexpr,
    VEC: tl.constexpr,  # as in the forward, for the fp32 gradient rows (VEC * 4 bytes)
):
    words = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = words < n_words
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(offs_ptr + words, mask=wmask, other=0).to(tl.int64)
    count = tl.load(offs_ptr + words + 1, mask=wmask, other=0).to(tl.int64) - start
    active = wmask
    if HAS_ZERO:
        active = active & (tl.load(zero_ptr + words, mask=wmask, other=0) == 0)
    n_iter = fmax(tl.where(active, count, 0), 0)
    k = tl.load(col_tab_ptr + cols, mask=cmask, other=0)
    dk = tl.load(col_dim_ptr + cols, mask=cmask, other=0).to(tl.int64)
    goff = tl.load(col_goff_ptr + cols, mask=cmask, other=0)
    m2 = active[:, None] & cmask[None, :]
    g = tl.load(gout_ptr + words.to(tl.int64)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    g = g / tl.maximum(count, 1).to(tl.float32)[:, None]  # d mean / d row = 1 / count
    for j in range(0, n_iter):
        m2 = (active & (j < count))[:, None] & cmask[None, :]
        ids = tl.load(ids_ptr + (start + j)[:, None] * K + k[None, :], mask=m2, other=0).to(tl.int64)
        ptrs = gflat_ptr + goff[None, :] + ids * dk[None, :]
        if VEC > 1:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, VEC * 4]), [1, VEC])
        # row 0 (padding) gets no gradient: it receives exact zeros (real data never carries id 0), so
        # that the mask stays per word and column, as in the forward
        tl.atomic_add(ptrs, tl.where(ids != 0, g, 0.0), mask=m2, sem="relaxed")


@jit(do_not_specialize=["n_pairs"])
def _gcm_bwd_sorted_kernel(
    gflat_ptr,  # fp32 [sum_k V_k * D_k] flat table gradients, zero-initialised
    gout_ptr,  # [n_words, D] upstream gradient
    keys_ptr,  # int64 [n_pairs] sorted flat offsets of each (action, table) pair's row; SENTINEL: skip
    perm_ptr,  # int64 [n_pairs] the pair index a * K + k of each sorted key
    woa_ptr,  # int32 [n_actions] word of each action
    offs_ptr,  # int32/int64 [n_words + 1] (for the counts)
    tab_dim_ptr, tab_col_ptr,  # int32 [K]: D_k and the first output column of table k
    n_pairs, D, K, SENTINEL,
    BLOCK_E: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    e0 = tl.program_id(0) * BLOCK_E
    e = e0 + tl.arange(0, BLOCK_E)  # [BLOCK_E] sorted pairs of this block
    emask = e < n_pairs
    key = tl.load(keys_ptr + e, mask=emask, other=SENTINEL)
    valid = key != SENTINEL  # padding ids and zeroed words were keyed SENTINEL: they sort last
    prev = tl.load(keys_ptr + e - 1, mask=emask & (e > e0), other=-1)
    first = valid & (key != prev)  # the first pair of each run of equal keys within the block
    src = tl.load(perm_ptr + e, mask=valid, other=0)
    a = src // K
    k = src - a * K
    w = tl.load(woa_ptr + a, mask=valid, other=0).to(tl.int64)
    count = tl.load(offs_ptr + w + 1, mask=valid, other=1).to(tl.int64) - tl.load(offs_ptr + w, mask=valid, other=0)
    dk = tl.load(tab_dim_ptr + k, mask=valid, other=0)
    c0 = tl.load(tab_col_ptr + k, mask=valid, other=0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_DK + tl.arange(0, BLOCK_DK)  # this program's columns of the rows
    m2 = valid[:, None] & (d[None, :] < dk[:, None])
    g = tl.load(gout_ptr + w[:, None] * D + c0[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    g = g / tl.maximum(count, 1).to(tl.float32)[:, None]  # [BLOCK_E, BLOCK_DK]
    # Segment sum as a product with the 0/1 "same key" matrix: row i gets the sum over its run in
    # this block (runs are contiguous: the keys are sorted).  ieee: tf32 would round the gradients.
    same = ((key[:, None] == key[None, :]) & valid[None, :]).to(tl.float32)  # [BLOCK_E, BLOCK_E]
    run = tl.dot(same, g, input_precision="ieee")
    # One atomic per (row, block it spans): a run cut by a block boundary is finished by the next block.
    tl.atomic_add(gflat_ptr + key[:, None] + d[None, :], run, mask=first[:, None] & m2, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# 3. Launchers (validate shape, dtype, contiguity; launch)
# ----------------------------------------------------------------------------------------------

# Block-size overrides (None: the heuristics below).  Tests shrink them to cover multi-program and
# multi-column-block paths; benchmarks/gpu_check.py may sweep them.
CONFIG: dict[str, int | None] = {"block_w": None, "block_d": None, "block_e": None, "block_dk": None,
                                 "num_warps": None}
SENTINEL = 1 << 62  # key of pairs that add nothing (padding id, zeroed word); sorts after every row


@functools.lru_cache(maxsize=64)
def _layout(vocabs: tuple[int, ...], dims: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """The column maps and per-table offsets of one table layout, as small device tensors."""
    col_tab, col_dim, col_in, col_goff, tab_goff, tab_col = [], [], [], [], [], []
    goff = col = 0
    for k, (v, d) in enumerate(zip(vocabs, dims)):
        col_tab += [k] * d
        col_dim += [d] * d
        col_in += list(range(d))
        col_goff += [goff + c for c in range(d)]
        tab_goff.append(goff)
        tab_col.append(col)
        goff += v * d
        col += d
    i32, i64 = torch.int32, torch.int64
    return {
        "col_tab": int_array(col_tab, i32, device), "col_dim": int_array(col_dim, i32, device),
        "col_in": int_array(col_in, i32, device), "col_goff": int_array(col_goff, i64, device),
        "tab_goff": int_array(tab_goff, i64, device), "tab_dim": int_array(dims, i32, device),
        "tab_dim64": int_array(dims, i64, device), "tab_col": int_array(tab_col, i32, device),
    }


def _word_blocks(D: int, backward: bool = False) -> tuple[int, int, int]:
    block_d = CONFIG["block_d"] or min(next_pow2(D), 256)
    # GPU: ~1k elements per tile (8 words at D = 128, 8 per thread): the gathers hold a 64-bit
    # address per element, and 2k (16 words) took 126-157 registers (18.8% occupancy; sm_100 spilled).
    # The interpreter costs ~2 ms per program: few, large programs.
    elems = 16384 if interpreting() else 1024
    block_w = CONFIG["block_w"] or max(1, min(128, elems // block_d))  # <= 128 words: D = 1 too
    return block_w, block_d, CONFIG["num_warps"] or 4


def _vec(dims: tuple[int, ...], tensors: list[torch.Tensor], elt: int, block_d: int) -> int:
    """Columns per vector access: 16 bytes when every D_k, the column tile and every base pointer
    allow it (runs of VEC columns then never straddle two tables), else 1 (scalar, always right)."""
    vec = max(1, 16 // elt)
    while vec > 1 and (any(d % vec for d in dims) or block_d % vec
                       or any(t.data_ptr() % (vec * elt) for t in tensors)):
        vec //= 2
    return vec


def _extras_dtype(tables, add, pos_table, seg_vec) -> torch.dtype:
    dtype = tables[0].dtype
    for t in (add, pos_table, seg_vec):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_extras(n_words: int, D: int, device, zero_mask, add, pos_table, word_pos, seg_vec) -> None:
    if zero_mask is not None and (zero_mask.shape != (n_words,) or zero_mask.dtype != torch.bool):
        raise ValueError(f"{OP}: zero_mask must be bool [n_words={n_words}], got {zero_mask.dtype} "
                         f"{list(zero_mask.shape)}")
    if add is not None and add.shape != (n_words, D):
        raise ValueError(f"{OP}: add must be [n_words={n_words}, D={D}], got {list(add.shape)}")
    if (pos_table is None) != (word_pos is None):
        raise ValueError(f"{OP}: pos_table and word_pos go together (got only one of them)")
    if pos_table is not None and (pos_table.dim() != 2 or pos_table.shape[1] != D
                                  or word_pos.shape != (n_words,)):
        raise ValueError(f"{OP}: expected pos_table [P, D={D}] and word_pos [n_words={n_words}], got "
                         f"{list(pos_table.shape)} and {list(word_pos.shape)}")
    if seg_vec is not None and seg_vec.shape != (D,):
        raise ValueError(f"{OP}: seg_vec must be [D={D}], got {list(seg_vec.shape)}")
    for name, t in (("zero_mask", zero_mask), ("add", add), ("pos_table", pos_table), ("word_pos", word_pos),
                    ("seg_vec", seg_vec)):
        if t is not None and t.device != device:
            raise ValueError(f"{OP}: {name} is on {t.device}, the tables on {device}")


def _forward_triton(tables: list[torch.Tensor], attr_ids: torch.Tensor, word_offsets: torch.Tensor,
                    zero_mask: torch.Tensor | None = None, add: torch.Tensor | None = None,
                    pos_table: torch.Tensor | None = None, word_pos: torch.Tensor | None = None,
                    seg_vec: torch.Tensor | None = None) -> torch.Tensor:
    _check_inputs(tables, attr_ids, word_offsets)
    device = tables[0].device
    if attr_ids.device != device or word_offsets.device != device:
        raise ValueError(f"{OP}: attr_ids ({attr_ids.device}) and word_offsets ({word_offsets.device}) must be "
                         f"on the tables' device {device}")
    n_words, K = word_offsets.shape[0] - 1, len(tables)
    dims = tuple(int(t.shape[1]) for t in tables)
    D = sum(dims)
    _check_extras(n_words, D, device, zero_mask, add, pos_table, word_pos, seg_vec)
    out = torch.empty(n_words, D, dtype=_extras_dtype(tables, add, pos_table, seg_vec), device=device)
    if n_words == 0 or D == 0:
        return out
    tables = [t.contiguous() for t in tables]  # no copy for nn.Embedding weights
    lay = _layout(tuple(int(t.shape[0]) for t in tables), dims, device)
    block_w, block_d, num_warps = _word_blocks(D)
    vec = _vec(dims, tables, tables[0].element_size(), block_d)
    if vec == 1 and not interpreting() and CONFIG["block_w"] is None:
        block_w = max(1, block_w // 2)  # scalar gathers: twice the addresses live (sm_100 spilled at 8 words)
    dummy = out  # never read: the matching HAS_* flag is off
    _gcm_fwd_kernel[(cdiv(n_words, block_w), cdiv(D, block_d))](
        out, attr_ids.contiguous(), word_offsets.contiguous(), ptr_array(tables),
        lay["col_tab"], lay["col_dim"], lay["col_in"],
        zero_mask.view(torch.uint8) if zero_mask is not None else dummy,
        add.contiguous() if add is not None else dummy,
        pos_table.contiguous() if pos_table is not None else dummy,
        word_pos.contiguous() if word_pos is not None else dummy,
        seg_vec.contiguous() if seg_vec is not None else dummy,
        n_words, D, K,
        TAB_DTYPE=tl_dtype(tables[0].dtype), BLOCK_W=block_w, BLOCK_D=block_d,
        VEC=vec,
        HAS_ZERO=zero_mask is not None, HAS_ADD=add is not None, HAS_POS=pos_table is not None,
        HAS_SEG=seg_vec is not None, num_warps=num_warps,
    )
    return out


def _backward_triton(grad_out: torch.Tensor, shapes: list[tuple[int, int]], dtype: torch.dtype,
                     attr_ids: torch.Tensor, word_offsets: torch.Tensor, zero_mask: torch.Tensor | None,
                     backward: str) -> list[torch.Tensor]:
    """Table gradients (``dtype``, shapes ``shapes``) from ``grad_out [n_words, D]``, accumulated in fp32."""
    if backward not in BACKWARD_VARIANTS:
        raise ValueError(f"{OP}: backward must be one of {BACKWARD_VARIANTS}, got {backward!r}")
    device = grad_out.device
    vocabs, dims = tuple(v for v, _ in shapes), tuple(d for _, d in shapes)
    n_words, D, K = word_offsets.shape[0] - 1, sum(dims), len(shapes)
    if grad_out.shape != (n_words, D):
        raise ValueError(f"{OP}: grad_out must be [{n_words}, {D}], got {list(grad_out.shape)}")
    gflat = torch.zeros(sum(v * d for v, d in shapes), dtype=torch.float32, device=device)
    n_actions = attr_ids.shape[0]
    if n_words and n_actions and D:
        lay = _layout(vocabs, dims, device)
        grad_out, attr_ids, word_offsets = grad_out.contiguous(), attr_ids.contiguous(), word_offsets.contiguous()
        zero_u8 = zero_mask.view(torch.uint8) if zero_mask is not None else None
        if backward == "atomic":
            block_w, block_d, num_warps = _word_blocks(D, backward=True)
            _gcm_bwd_atomic_kernel[(cdiv(n_words, block_w), cdiv(D, block_d))](
                gflat, grad_out, attr_ids, word_offsets, lay["col_tab"], lay["col_dim"], lay["col_goff"],
                zero_u8 if zero_u8 is not None else gflat, n_words, D, K,
                BLOCK_W=block_w, BLOCK_D=block_d, HAS_ZERO=zero_mask is not None,
                VEC=_vec(dims, [gflat], 4, block_d), num_warps=num_warps,
            )
        else:
            _backward_sorted(gflat, grad_out, attr_ids, word_offsets, zero_mask, lay, n_words, D, K, max(dims))
    grads, off = [], 0
    for v, d in shapes:
        grads.append(gflat[off:off + v * d].view(v, d).to(dtype))  # fp32 tables: views, no copy
        off += v * d
    return grads


def _backward_sorted(gflat, grad_out, attr_ids, word_offsets, zero_mask, lay, n_words, D, K, max_dim) -> None:
    n_actions = attr_ids.shape[0]
    ids = attr_ids.long()  # [n_actions, K]
    keys = lay["tab_goff"][None, :] + ids * lay["tab_dim64"][None, :]  # flat offset of each pair's grad row
    drop = ids == 0
    lengths = (word_offsets[1:] - word_offsets[:-1]).long()  # [n_words]
    # output_size: no device sync to learn the total (it is n_actions by the CSR contract)
    woa = torch.repeat_interleave(torch.arange(n_words, device=ids.device), lengths, output_size=n_actions)
    if zero_mask is not None:
        drop |= zero_mask.index_select(0, woa)[:, None]
    skeys, perm = torch.sort(keys.masked_fill_(drop, SENTINEL).view(-1))  # [n_actions * K]
    # GPU: the run sums are an ieee fp32 tl.dot, i.e. CUDA-core FMAs whose registers grow with
    # BLOCK_E x (BLOCK_E + BLOCK_DK): 32 pairs x 32 columns per program (a second grid axis covers
    # wider rows); BLOCK_E = 64 x 64 columns spilled 2-5 KB at 255 registers.
    interp = interpreting()
    block_e = CONFIG["block_e"] or (256 if interp else 32)
    block_dk = max(16, next_pow2(max_dim))  # tl.dot wants >= 16 on GPUs
    if not interp:
        block_dk = min(block_dk, CONFIG["block_dk"] or 32)
    n_pairs = n_actions * K
    _gcm_bwd_sorted_kernel[(cdiv(n_pairs, block_e), cdiv(max_dim, block_dk))](
        gflat, grad_out, skeys, perm, woa.to(torch.int32), word_offsets, lay["tab_dim"], lay["tab_col"],
        n_pairs, D, K, SENTINEL, BLOCK_E=block_e, BLOCK_DK=block_dk, num_warps=CONFIG["num_warps"] or 4,
    )


def _extras_backward(grad_out: torch.Tensor, add_dtype, pos_shape_dtype, word_pos, seg_dtype, need):
    """Gradients of add, pos_table and seg_vec: plain torch over [n_words, D] (cheap next to the gather)."""
    g_add = grad_out.to(add_dtype) if add_dtype is not None and need[0] else None
    g_pos = g_seg = None
    if pos_shape_dtype is not None and need[1]:
        shape, dtype = pos_shape_dtype
        g_pos = torch.zeros(shape, dtype=torch.float32, device=grad_out.device).index_add_(
            0, word_pos.long(), grad_out.float()).to(dtype)
    if seg_dtype is not None and need[2]:
        g_seg = grad_out.float().sum(0).to(seg_dtype)
    return g_add, g_pos, g_seg


# ----------------------------------------------------------------------------------------------
# 4. autograd.Function (eager) and torch.library op (torch.compile); both only call the launchers
# ----------------------------------------------------------------------------------------------


def _meta(t: torch.Tensor | None):
    return None if t is None else t.dtype


class _GatherConcatMeanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec, backward, *tables):
        out = _forward_triton(list(tables), attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec)
        ctx.save_for_backward(attr_ids, word_offsets, zero_mask, word_pos)
        ctx.shapes = [tuple(t.shape) for t in tables]
        ctx.dtype = tables[0].dtype
        ctx.extras = (_meta(add), None if pos_table is None else (tuple(pos_table.shape), pos_table.dtype),
                      _meta(seg_vec))
        ctx.backward = backward
        return out

    @staticmethod
    def backward(ctx, grad_out):
        attr_ids, word_offsets, zero_mask, word_pos = ctx.saved_tensors
        need = ctx.needs_input_grad
        if any(need[8:]):
            grads = _backward_triton(grad_out, ctx.shapes, ctx.dtype, attr_ids, word_offsets, zero_mask,
                                     ctx.backward)
            grads = [g if n else None for g, n in zip(grads, need[8:])]
        else:
            grads = [None] * len(ctx.shapes)
        g_add, g_pos, g_seg = _extras_backward(grad_out, *ctx.extras[:2], word_pos, ctx.extras[2],
                                               (need[3], need[4], need[6]))
        return (None, None, None, g_add, g_pos, None, g_seg, None, *grads)


if tl is not None:
    from typing import Optional

    Tensor = torch.Tensor

    @torch.library.custom_op("userbert::gather_concat_mean", mutates_args=())
    def _gcm_op(tables: list[Tensor], attr_ids: Tensor, word_offsets: Tensor,
                zero_mask: Optional[Tensor], add: Optional[Tensor], pos_table: Optional[Tensor],  # noqa: UP045
                word_pos: Optional[Tensor], seg_vec: Optional[Tensor], backward: str) -> Tensor:  # noqa: UP045
        return _forward_triton(tables, attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec)

    @_gcm_op.register_fake
    def _(tables, attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec, backward):
        D = sum(t.shape[1] for t in tables)
        return tables[0].new_empty(word_offsets.shape[0] - 1, D, dtype=_extras_dtype(tables, add, pos_table, seg_vec))

    @torch.library.custom_op("userbert::gather_concat_mean_backward", mutates_args=())
    def _gcm_bwd_op(grad_out: Tensor, tables: list[Tensor], attr_ids: Tensor, word_offsets: Tensor,
                    zero_mask: Optional[Tensor], backward: str) -> list[Tensor]:  # noqa: UP045
        grads = _backward_triton(grad_out, [tuple(t.shape) for t in tables], tables[0].dtype, attr_ids,
                                 word_offsets, zero_mask, backward)
        # fp32 gradients are views of one flat buffer; a custom op's outputs may not alias each other
        return [g.clone() if g._base is not None else g for g in grads]

    @_gcm_bwd_op.register_fake
    def _(grad_out, tables, attr_ids, word_offsets, zero_mask, backward):
        return [torch.empty_like(t) for t in tables]

    def _gcm_setup_context(ctx, inputs, output):
        tables, attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec, backward = inputs
        ctx.save_for_backward(attr_ids, word_offsets, zero_mask, word_pos, *tables)
        ctx.extras = (_meta(add), None if pos_table is None else (tuple(pos_table.shape), pos_table.dtype),
                      _meta(seg_vec))
        ctx.backward = backward

    def _gcm_op_backward(ctx, grad_out):
        attr_ids, word_offsets, zero_mask, word_pos, *tables = ctx.saved_tensors
        grads = torch.ops.userbert.gather_concat_mean_backward(grad_out, tables, attr_ids, word_offsets, zero_mask,
                                                                ctx.backward)
        g_add, g_pos, g_seg = _extras_backward(grad_out, *ctx.extras[:2], word_pos, ctx.extras[2],
                                               (True, True, True))
        return grads, None, None, None, g_add, g_pos, None, g_seg, None

    _gcm_op.register_autograd(_gcm_op_backward, setup_context=_gcm_setup_context)
    register_triton(OP)


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------


def gather_concat_mean(tables: list[torch.Tensor], attr_ids: torch.Tensor, word_offsets: torch.Tensor, *,
                       zero_mask: torch.Tensor | None = None, add: torch.Tensor | None = None,
                       pos_table: torch.Tensor | None = None, word_pos: torch.Tensor | None = None,
                       seg_vec: torch.Tensor | None = None, impl: str = "auto",
                       backward: str | None = None) -> torch.Tensor:
    """Token vectors ``[n_words, sum_k D_k]`` (see the module docstring for the exact semantics).

    tables: K tensors ``[V_k, D_k]`` (one float dtype and device); attr_ids: int32 ``[n_actions, K]``;
    word_offsets: int32 ``[n_words + 1]``.  Optional fusions, applied in this order:
      zero_mask: bool ``[n_words]``, True: the word's mean is zeroed (the 80% of masked words);
      add: ``[n_words, D]``, pos_table ``[P, D]`` with word_pos int ``[n_words]``, seg_vec ``[D]``:
      added after the zeroing (position + segment embeddings).
    impl: ``"auto" | "triton" | "torch"`` (kernels/dispatch.py).  backward: the Triton backward,
    ``"atomic"`` or ``"sorted"`` (default :data:`DEFAULT_BACKWARD`); the torch path ignores it.
    """
    backward = backward or DEFAULT_BACKWARD
    if backward not in BACKWARD_VARIANTS:
        raise ValueError(f"{OP}: backward must be one of {BACKWARD_VARIANTS}, got {backward!r}")
    if tables:
        _check_extras(word_offsets.shape[0] - 1, sum(int(t.shape[1]) for t in tables), tables[0].device, zero_mask,
                      add, pos_table, word_pos, seg_vec)
    if resolve_impl(impl, tables, attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec,
                    op=OP) == "triton":
        if torch.compiler.is_compiling():
            return torch.ops.userbert.gather_concat_mean(list(tables), attr_ids, word_offsets, zero_mask, add,
                                                         pos_table, word_pos, seg_vec, backward)
        return _GatherConcatMeanTriton.apply(attr_ids, word_offsets, zero_mask, add, pos_table, word_pos, seg_vec,
                                             backward, *tables)
    out = gather_concat_mean_reference(tables, attr_ids, word_offsets)
    if zero_mask is not None:
        out = out.masked_fill(zero_mask[:, None], 0.0)  # out of place: autograd zeroes those rows' grads
    if add is not None:
        out = out + add
    if pos_table is not None:
        out = out + F.embedding(word_pos.long(), pos_table)
    if seg_vec is not None:
        out = out + seg_vec
    return out
