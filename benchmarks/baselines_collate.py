"""The collate a user would otherwise write: vectorised NumPy (no Python loop over users or words).

Same contract as :class:`engine.data.collate.Collator` (FORMATS.md §5): the users' rows gathered into batch
CSR arrays, ``select_prob`` of each user's words masked (a random rank per word, the lowest ``n_mask``
selected), and per attribute the distinct nonzero values of each masked word (``np.unique`` over
(masked word, value) keys, so ascending here).  Its masks come from NumPy's generator, so only the
layout and, with every word selected, the labels can be compared with ours.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.data.batch import Batch, SegmentBatch


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)) without a Python loop."""
    total = int(counts.sum())
    before = np.cumsum(counts) - counts
    return np.repeat(starts - before, counts) + np.arange(total)


def numpy_collate(data, user_attr_offsets: np.ndarray, users: np.ndarray, seed: int, select_prob: float = 0.15,
                  zero_prob: float = 0.8) -> Batch:
    rng = np.random.default_rng(seed)
    segs = data.segments
    B, U = len(users), data.user_attr_ids.shape[1]
    n_words = np.stack([s.user_word_offsets[users + 1] - s.user_word_offsets[users] for s in segs], axis=1)
    per_user = n_words.sum(axis=1)
    seq_lens = 1 + U + per_user
    T = int(seq_lens.max())

    # Masking over each user's words (both segments, user-major): the n_mask lowest random keys.
    owner = np.repeat(np.arange(B), per_user)
    order = np.lexsort((rng.random(len(owner)), owner))
    rank = np.empty(len(owner), dtype=np.int64)
    rank[order] = np.arange(len(owner)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    n_mask = np.where(per_user > 0, np.maximum(1, np.floor(select_prob * per_user + 0.5)), 0)
    selected = rank < n_mask[owner] if select_prob > 0 else np.zeros(len(owner), dtype=bool)
    zeroed = rng.random(len(owner)) < zero_prob
    user_flag_start = np.cumsum(per_user) - per_user

    out = []
    for s, seg in enumerate(segs):
        counts = n_words[:, s]
        words = _ranges(seg.user_word_offsets[users], counts)
        rows = _ranges(seg.user_action_offsets[users],
                       seg.user_action_offsets[users + 1] - seg.user_action_offsets[users])
        attr = seg.attr_ids[rows]
        lens = seg.word_len[words].astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        before = n_words[:, :s].sum(axis=1)
        within = _ranges(np.zeros(B, dtype=np.int64), counts)
        slot = np.repeat(np.arange(B) * T + 1 + U + before, counts) + within
        flag = np.repeat(user_flag_start + before, counts) + within
        masked = np.flatnonzero(selected[flag])
        m_lens = lens[masked]
        m_rows = _ranges(offsets[masked], m_lens)
        m_word = np.repeat(np.arange(len(masked)), m_lens)
        label_offsets, label_ids = [], []
        for k in range(attr.shape[1]):
            values = attr[m_rows, k].astype(np.int64)
            keep = values != 0
            span = int(values.max(initial=0)) + 1
            keys = np.unique(m_word[keep] * span + values[keep])  # sorted: by masked word, then value
            per_word = np.bincount(keys // span, minlength=len(masked))
            label_offsets.append(torch.from_numpy(np.concatenate([[0], np.cumsum(per_word)]).astype(np.int32)))
            label_ids.append(torch.from_numpy((keys % span).astype(np.int32)))
        out.append(SegmentBatch(
            attr_ids=torch.from_numpy(np.ascontiguousarray(attr)),
            word_offsets=torch.from_numpy(offsets.astype(np.int32)),
            word_pos=torch.from_numpy(seg.word_pos[words]), word_slot=torch.from_numpy(slot),
            masked=torch.from_numpy(masked), masked_zero=torch.from_numpy(zeroed[flag][masked]),
            label_offsets=label_offsets, label_ids=label_ids))
    ua = (data.user_attr_ids[users] + np.asarray(user_attr_offsets, dtype=np.int32)[None, :]).astype(np.int32)
    return Batch(segments=out, user_attr_ids=torch.from_numpy(ua), seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
                 max_len=T, users=torch.from_numpy(users.astype(np.int64)))
