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


@njit(cache=True)
def _gather_segment(users, user_word_offsets, word_pos, word_len, user_action_offsets, attr_ids, slot_start):
    """Copy the users' words and actions of one segment into batch-local CSR arrays.

    slot_start: int64 [B]  flat grid index of each user's first word of this segment.
    Returns attr_ids [A, K], word_offsets int32 [W+1], word_pos int32 [W], word_slot int64 [W].
    """
    B = users.shape[0]
    K = attr_ids.shape[1]
    W = 0
    A = 0
    for b in range(B):
        u = users[b]
        W += user_word_offsets[u + 1] - user_word_offsets[u]
        A += user_action_offsets[u + 1] - user_action_offsets[u]
    out_attr = np.empty((A, K), dtype=np.int32)
    out_off = np.empty(W + 1, dtype=np.int32)
    out_pos = np.empty(W, dtype=np.int32)
    out_slot = np.empty(W, dtype=np.int64)
    w = 0
    a = 0
    out_off[0] = 0
    for b in range(B):
        u = users[b]
        a0 = user_action_offsets[u]
        a1 = user_action_offsets[u + 1]
        for i in range(a1 - a0):
            for k in range(K):
                out_attr[a + i, k] = attr_ids[a0 + i, k]
        w0 = user_word_offsets[u]
        for i in range(user_word_offsets[u + 1] - w0):
            out_pos[w] = word_pos[w0 + i]
            out_slot[w] = slot_start[b] + i
            out_off[w + 1] = out_off[w] + word_len[w0 + i]
            w += 1
        a += a1 - a0
    return out_attr, out_off, out_pos, out_slot


@njit(cache=True)
def _distinct_labels(attr_ids, word_offsets, masked, k):
    """CSR of the distinct nonzero values of attribute k in each masked word, ascending."""
    M = masked.shape[0]
    offsets = np.zeros(M + 1, dtype=np.int32)
    total = 0
    for m in range(M):
        w = masked[m]
        total += word_offsets[w + 1] - word_offsets[w]
    ids = np.empty(total, dtype=np.int32)
    n = 0
    for m in range(M):
        w = masked[m]
        start = n
        for a in range(word_offsets[w], word_offsets[w + 1]):
            v = attr_ids[a, k]
            if v == 0:
                continue
            # Insertion into the sorted run ids[start:n]; words hold at most a few dozen actions.
            j = n
            dup = False
            while j > start and ids[j - 1] >= v:
                if ids[j - 1] == v:
                    dup = True
                    break
                j -= 1
            if dup:
                continue
            for t in range(n, j, -1):
                ids[t] = ids[t - 1]
            ids[j] = v
            n += 1
        offsets[m + 1] = n
    return offsets, ids[:n].copy()


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
            attr, offs, pos, slot = _gather_segment(
                users, seg.user_word_offsets, seg.word_pos, seg.word_len, seg.user_action_offsets,
                seg.attr_ids, slot_start,
            )
            seg_flags = flags[_ranges(user_start + seg_before[:, s], n_words[:, s])]
            masked = np.flatnonzero(seg_flags).astype(np.int64)
            zero = seg_flags[masked] == SELECTED_ZERO
            label_offsets, label_ids = [], []
            for k in range(attr.shape[1]):
                lo, li = _distinct_labels(attr, offs, masked, k)
                label_offsets.append(torch.from_numpy(lo))
                label_ids.append(torch.from_numpy(li))
            out.append(SegmentBatch(
                attr_ids=torch.from_numpy(attr), word_offsets=torch.from_numpy(offs),
                word_pos=torch.from_numpy(pos), word_slot=torch.from_numpy(slot),
                masked=torch.from_numpy(masked), masked_zero=torch.from_numpy(zero),
                label_offsets=label_offsets, label_ids=label_ids,
            ))
        ua = self.data.user_attr_ids[users] + self.user_attr_offsets[None, :] if U else np.zeros((B, 0), np.int32)
        return Batch(
            segments=out,
            user_attr_ids=torch.from_numpy(np.ascontiguousarray(ua, dtype=np.int32)),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
            max_len=T,
            users=torch.from_numpy(users.copy()),
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair (vectorised)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    idx = np.arange(total, dtype=np.int64)
    first = np.repeat(ends - lengths, lengths)
    return idx - first + np.repeat(starts.astype(np.int64), lengths)
