"""Collate: users -> Batch, with masking and CSR multi-hot labels, in Numba.

The inputs are the tokenized arrays of :class:`tokenizer.shards.TokenizedData` (CSR, no padding);
the output is an :class:`engine.batch.Batch` (FORMATS.md §5).  Every loop that touches words or
actions is an ``@njit`` function: collate runs once per step for every user in the batch and must
never be what a GPU waits for.

Masking (FORMATS.md §5): per user, ``n_mask = max(1, floor(select_prob * n + 0.5))`` of the user's
n behaviour words (both segments together) are drawn uniformly without replacement; each drawn
word is zeroed with probability ``zero_prob`` and left unchanged otherwise.  The draws come from
Numba's generator seeded per batch, so a batch is a pure function of (users, seed): a resumed run
sees exactly the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

from engine.batch import Batch, SegmentBatch

if TYPE_CHECKING:
    from tokenizer.shards import SegmentArrays, TokenizedData

NOT_SELECTED, SELECTED_KEEP, SELECTED_ZERO = 0, 1, 2


@njit(cache=True)
def _select_words(n_words: np.ndarray, select_prob: float, zero_prob: float, seed: int) -> np.ndarray:
    """Mask flags for every word of the batch, laid out user-major then segment then word.

    n_words: int64 [B, S] words per user and segment.  Returns int8 [sum n_words] flags.
    """
    np.random.seed(seed)
    B, S = n_words.shape
    total = 0
    for b in range(B):
        for s in range(S):
            total += n_words[b, s]
    flags = np.zeros(total, dtype=np.int8)
    start = 0
    for b in range(B):
        n = 0
        for s in range(S):
            n += n_words[b, s]
        if n > 0 and select_prob > 0.0:
            k = max(1, int(np.floor(select_prob * n + 0.5)))
            # Partial Fisher-Yates: the first k entries of a random permutation of 0..n-1.
            perm = np.arange(n)
            for i in range(k):
                j = i + np.random.randint(0, n - i)
                perm[i], perm[j] = perm[j], perm[i]
                flags[start + perm[i]] = SELECTED_ZERO if np.random.random() < zero_prob else SELECTED_KEEP
        start += n
    return flags


# ctz by de Bruijn multiplication: the index of the lowest set bit of a uint64 (x & -x) is
# _CTZ[(lowest * _DEBRUIJN) >> 58].
_DEBRUIJN = 0x03F79D71B4CB0A89
_CTZ = np.zeros(64, dtype=np.int32)
for _i in range(64):
    _CTZ[((1 << _i) * _DEBRUIJN & 0xFFFFFFFFFFFFFFFF) >> 58] = _i


@njit(cache=True, inline="always")
def _word_labels(out_attr, r0, r1, label_ids, n_labels, bits, count, buf):
    """Append the distinct nonzero values of every attribute k in rows r0:r1 to ``label_ids[k]``, ascending.

    One pass over the word's rows (each row's K ids are contiguous).  Ids below 64 (action type, hour,
    device, and the head of every Zipf-like vocabulary) go to a 64-bit set per attribute, read out lowest bit
    first; larger ids are insertion-sorted into ``buf[k]`` (a word holds at most a few dozen actions).  Every
    small id precedes every large one, so the two lists concatenate in order.
    """
    K = out_attr.shape[1]
    for k in range(K):
        bits[k] = 0
        count[k] = 0
    for r in range(r0, r1):
        for k in range(K):
            v = out_attr[r, k]
            if v < 64:
                bits[k] |= np.uint64(1) << np.uint64(v)
                continue
            c = count[k]
            t = c
            while t > 0 and buf[k, t - 1] > v:
                t -= 1
            if t > 0 and buf[k, t - 1] == v:
                continue
            for q in range(c, t, -1):
                buf[k, q] = buf[k, q - 1]
            buf[k, t] = v
            count[k] = c + 1
    for k in range(K):
        b = bits[k] & ~np.uint64(1)  # id 0 is padding, never a label
        n = n_labels[k]
        while b:
            low = b & (~b + np.uint64(1))
            label_ids[k, n] = _CTZ[(low * np.uint64(_DEBRUIJN)) >> np.uint64(58)]
            n += 1
            b ^= low
        for i in range(count[k]):
            label_ids[k, n + i] = buf[k, i]
        n_labels[k] = n + count[k]


@njit(cache=True)
def _collate_segment(users, user_word_offsets, word_pos, word_len, user_action_offsets, attr_ids, slot_start,
                     flags, flag_start):
    """One segment of the batch in one pass: the users' words and actions copied into batch-local CSR
    arrays, the masked words, and the label CSR of every attribute.

    slot_start: int64 [B]  flat grid index of each user's first word of this segment.
    flags: int8 [*] mask flags of :func:`_select_words`; flag_start: int64 [B] where user b's flags for
    this segment begin.
    Returns attr_ids int32 [A, K], word_offsets int32 [W+1], word_pos int32 [W], word_slot int64 [W],
    masked int64 [M], masked_zero bool [M], label_offsets int32 [K, M+1], label_ids int32 [K, cap]
    (row k's first label_offsets[k, M] entries are attribute k's labels).
    """
    B = users.shape[0]
    K = attr_ids.shape[1]
    W = 0
    A = 0
    M = 0
    cap = 0  # actions in masked words: bounds every attribute's label count
    longest = 1
    for b in range(B):
        u = users[b]
        w0 = user_word_offsets[u]
        nw = user_word_offsets[u + 1] - w0
        W += nw
        A += user_action_offsets[u + 1] - user_action_offsets[u]
        for i in range(nw):
            if flags[flag_start[b] + i] != 0:
                M += 1
                cap += word_len[w0 + i]
                longest = max(longest, word_len[w0 + i])
    out_attr = np.empty((A, K), dtype=np.int32)
    out_off = np.empty(W + 1, dtype=np.int32)
    out_pos = np.empty(W, dtype=np.int32)
    out_slot = np.empty(W, dtype=np.int64)
    masked = np.empty(M, dtype=np.int64)
    zero = np.empty(M, dtype=np.bool_)
    label_off = np.zeros((K, M + 1), dtype=np.int32)
    label_ids = np.empty((K, max(cap, 1)), dtype=np.int32)
    n_labels = np.zeros(K, dtype=np.int64)
    buf = np.empty((K, longest), dtype=np.int32)
    bits = np.zeros(K, dtype=np.uint64)
    count = np.zeros(K, dtype=np.int64)
    w = 0
    a = 0
    m = 0
    out_off[0] = 0
    flat_src = attr_ids.reshape(-1)  # rows are contiguous: a user's actions are one block copy
    flat_dst = out_attr.reshape(-1)
    for b in range(B):
        u = users[b]
        a0 = user_action_offsets[u]
        n_act = user_action_offsets[u + 1] - a0
        flat_dst[a * K:(a + n_act) * K] = flat_src[a0 * K:(a0 + n_act) * K]
        w0 = user_word_offsets[u]
        for i in range(user_word_offsets[u + 1] - w0):
            out_pos[w] = word_pos[w0 + i]
            out_slot[w] = slot_start[b] + i
            out_off[w + 1] = out_off[w] + word_len[w0 + i]
            f = flags[flag_start[b] + i]
            if f != 0:
                masked[m] = w
                zero[m] = f == SELECTED_ZERO
                # Labels now, while the user's rows just copied are still in cache; masked words come in
                # user order, so every attribute's CSR is appended in order.
                _word_labels(out_attr, out_off[w], out_off[w + 1], label_ids, n_labels, bits, count, buf)
                for k in range(K):
                    label_off[k, m + 1] = n_labels[k]
                m += 1
            w += 1
        a += n_act
    return out_attr, out_off, out_pos, out_slot, masked, zero, label_off, label_ids


@dataclass
class CollateConfig:
    select_prob: float = 0.15  # 0 disables masking (fine-tuning, embedding export)
    zero_prob: float = 0.8


class Collator:
    """Builds Batches from rows of a TokenizedData.  Picklable, so loader workers can hold one."""

    def __init__(self, data: TokenizedData, user_attr_offsets: list[int], cfg: CollateConfig | None = None):
        self.data = data
        self.cfg = cfg or CollateConfig()
        self.user_attr_offsets = np.asarray(user_attr_offsets, dtype=np.int32)
        self.n_user_attr = data.user_attr_ids.shape[1]

    def __call__(self, users: np.ndarray, seed: int = 0) -> Batch:
        users = np.ascontiguousarray(users, dtype=np.int64)
        segs: list[SegmentArrays] = self.data.segments
        B, S, U = users.shape[0], len(segs), self.n_user_attr
        n_words = np.empty((B, S), dtype=np.int64)
        for s, seg in enumerate(segs):
            n_words[:, s] = seg.user_word_offsets[users + 1] - seg.user_word_offsets[users]
        seq_lens = 1 + U + n_words.sum(axis=1)
        T = int(seq_lens.max()) if B else 1 + U

        flags = _select_words(n_words, self.cfg.select_prob, self.cfg.zero_prob, seed)
        # flags are user-major; regroup them segment-major to match each segment's word order.
        per_user = n_words.sum(axis=1)
        user_start = np.concatenate([[0], np.cumsum(per_user)[:-1]]) if B else np.zeros(0, np.int64)
        seg_before = np.concatenate([np.zeros((B, 1), np.int64), np.cumsum(n_words, axis=1)[:, :-1]], axis=1)

        out = []
        for s, seg in enumerate(segs):
            slot_start = np.arange(B, dtype=np.int64) * T + 1 + U + seg_before[:, s]
            attr, offs, pos, slot, masked, zero, lo, li = _collate_segment(
                users, seg.user_word_offsets, seg.word_pos, seg.word_len, seg.user_action_offsets,
                np.ascontiguousarray(seg.attr_ids), slot_start, flags, user_start + seg_before[:, s],
            )
            nnz = lo[:, -1]  # [K] labels per attribute
            out.append(SegmentBatch(
                attr_ids=torch.from_numpy(attr), word_offsets=torch.from_numpy(offs),
                word_pos=torch.from_numpy(pos), word_slot=torch.from_numpy(slot),
                masked=torch.from_numpy(masked), masked_zero=torch.from_numpy(zero),
                label_offsets=[torch.from_numpy(lo[k]) for k in range(lo.shape[0])],
                label_ids=[torch.from_numpy(li[k, :nnz[k]]) for k in range(lo.shape[0])],
            ))
        ua = self.data.user_attr_ids[users] + self.user_attr_offsets[None, :] if U else np.zeros((B, 0), np.int32)
        return Batch(
            segments=out,
            user_attr_ids=torch.from_numpy(np.ascontiguousarray(ua, dtype=np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            max_len=T,
            users=torch.from_numpy(users.copy()),
        )

