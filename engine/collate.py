"""Collate: users -> one packed batch buffer, with masking and CSR multi-hot labels, in Numba.

The inputs are the tokenized arrays of :class:`tokenizer.shards.TokenizedData` (CSR, no padding);
the output is a :class:`engine.batch.PackedBatch`: every tensor of the batch (FORMATS.md §5) written
straight into one aligned buffer, which loader workers send as is and the trainer reads as views
(:meth:`Collator.__call__` returns those views as a :class:`engine.batch.Batch`).  Every loop that
touches words or actions is an ``@njit`` function: collate runs once per step for every user in the
batch and must never be what a GPU waits for.

Three passes, each over the batch's users only: :func:`_plan` (sequence lengths, grid slots, and the
masked words), :func:`_segment_sizes` (how large each array is, to lay the buffer out), and
:func:`_fill_segment` per segment (copy the user's rows, then the labels of its masked words while
those rows are still in cache, and hint the next user's rows into cache).

Masking (FORMATS.md §5): per user, ``n_mask = max(1, floor(select_prob * n + 0.5))`` of the user's
n behaviour words (both segments together) are drawn uniformly without replacement (Floyd's
algorithm); each drawn word is zeroed with probability ``zero_prob`` and left unchanged otherwise.
The draws come from a SplitMix64 stream seeded per batch, so a batch is a pure function of
(users, seed): a resumed run sees exactly the same masks.

Labels: the distinct nonzero values of each attribute in each masked word, in order of first
occurrence.  Distinctness is checked against a "last seen in word m" stamp per vocabulary id, which
costs one load and one store per value and no branch; attributes with vocabularies too large for a
stamp table (over :data:`STAMP_MAX_VOCAB` ids) fall back to a scan of the word's labels so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

from engine.batch import Batch, BufferLayout, PackedBatch, unpack_batch
from engine.prefetch import prefetch

if TYPE_CHECKING:
    from tokenizer.shards import TokenizedData

NOT_SELECTED, SELECTED_KEEP, SELECTED_ZERO = 0, 1, 2
STAMP_MAX_VOCAB = 1 << 22  # a stamp table of 4M int32 (16 MiB) is the most worth allocating per batch


@njit(cache=True, inline="always")
def _splitmix64(state):
    """(next state, 64 random bits): SplitMix64, one multiply-xorshift mix per draw."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True)
def _plan(users, user_word_offsets, n_user_attr, select_prob, zero_prob, seed):
    """Sequence lengths, grid layout and mask flags of a batch.

    users: int64 [B] dataset rows; user_word_offsets: tuple of S int64 [N+1] (one per segment).
    Returns seq_lens int32 [B], T (the grid's padded length), flags int8 [sum of words] (user-major,
    then segment, then word), flag_start int64 [B, S] (where user b's flags of segment s begin) and
    slot_start int64 [B, S] (flat grid index of user b's first word of segment s).
    """
    B = users.shape[0]
    S = len(user_word_offsets)
    n_words = np.empty((B, S), dtype=np.int64)
    seq_lens = np.empty(B, dtype=np.int32)
    flag_start = np.empty((B, S), dtype=np.int64)
    total = 0
    T = 1 + n_user_attr
    for b in range(B):
        u = users[b]
        n = 0
        s = 0
        for offsets in user_word_offsets:
            c = offsets[u + 1] - offsets[u]
            n_words[b, s] = c
            flag_start[b, s] = total + n
            n += c
            s += 1
        seq_lens[b] = 1 + n_user_attr + n
        T = max(T, 1 + n_user_attr + n)
        total += n
    slot_start = np.empty((B, S), dtype=np.int64)
    for b in range(B):
        slot = b * T + 1 + n_user_attr  # [CLS] and the user-attribute tokens come first
        for s in range(S):
            slot_start[b, s] = slot
            slot += n_words[b, s]
    flags = np.zeros(total, dtype=np.int8)
    if select_prob > 0.0:
        state = np.uint64(seed) * np.uint64(0xD1B54A32D192ED03)
        zero_below = np.uint64(zero_prob * 4294967296.0)
        low32 = np.uint64(0xFFFFFFFF)
        for b in range(B):
            start = flag_start[b, 0]
            n = seq_lens[b] - 1 - n_user_attr
            if n == 0:
                continue
            k = max(1, int(np.floor(select_prob * n + 0.5)))
            # Floyd's algorithm: a uniform k-subset of 0..n-1 in k draws, no permutation array.  The high
            # 32 bits of a draw pick the word (multiply-shift), the low 32 decide zero or keep.
            for j in range(n - k, n):
                state, r = _splitmix64(state)
                t = start + np.int64(((r >> np.uint64(32)) * np.uint64(j + 1)) >> np.uint64(32))
                if flags[t] != NOT_SELECTED:
                    t = start + j
                flags[t] = SELECTED_ZERO if (r & low32) < zero_below else SELECTED_KEEP
    return seq_lens, T, flags, flag_start, slot_start


@njit(cache=True)
def _segment_sizes(users, user_word_offsets, word_len, user_action_offsets, flags, flag_start, s):
    """(actions, words, masked words, actions in masked words) of segment ``s`` for these users.
    The last bounds every attribute's label count."""
    A = W = M = cap = 0
    for b in range(users.shape[0]):
        u = users[b]
        w0 = user_word_offsets[u]
        nw = user_word_offsets[u + 1] - w0
        W += nw
        A += user_action_offsets[u + 1] - user_action_offsets[u]
        f0 = flag_start[b, s]
        for i in range(nw):
            if flags[f0 + i] != NOT_SELECTED:
                M += 1
                cap += word_len[w0 + i]
    return A, W, M, cap


@njit(cache=True)
def _fill_segment(users, user_word_offsets, word_pos, word_len, user_action_offsets, attr_ids, vocab,
                  slot_start, flags, flag_start, s,
                  out_attr, out_off, out_pos, out_slot, masked, zero, label_off, label_ids):
    """Write segment ``s`` of the batch into the given arrays (sized by :func:`_segment_sizes`).

    vocab: int64 [K] vocabulary size of each attribute.  out_attr int32 [A, K], out_off int32 [W+1],
    out_pos int32 [W], out_slot int64 [W], masked int64 [M], zero bool [M], label_off int32 [K, M+1],
    label_ids int32 [K, cap] (scratch: attribute k's labels are its first label_off[k, M] entries).
    Returns nothing; label_off[:, M] holds each attribute's label count.
    """
    B = users.shape[0]
    K = attr_ids.shape[1]
    stamp_base = np.zeros(K + 1, dtype=np.int64)  # attribute k's stamps: seen[stamp_base[k]:stamp_base[k+1]]
    for k in range(K):
        stamp_base[k + 1] = stamp_base[k] + (vocab[k] if vocab[k] <= STAMP_MAX_VOCAB else 0)
    # seen[id] = m + 1 once id was emitted for masked word m: ids repeat within a word, and every word gets
    # a fresh stamp, so nothing is ever reset.
    seen = np.zeros(stamp_base[K] if masked.shape[0] else 0, dtype=np.int32)
    n_labels = np.zeros(K, dtype=np.int64)
    for k in range(K):
        label_off[k, 0] = 0
    flat_src = attr_ids.reshape(-1)  # a user's actions are one contiguous block of rows
    flat_dst = out_attr.reshape(-1)
    w = 0
    a = 0
    m = 0
    out_off[0] = 0
    for b in range(B):
        u = users[b]
        if b + 1 < B:
            # The next user's rows are cold (users are random rows of large arrays): ask for them now so
            # the misses overlap this user's work.  One hint per 64-byte line.
            v = users[b + 1]
            for p in range(user_action_offsets[v] * K, user_action_offsets[v + 1] * K, 16):
                prefetch(flat_src, p)
            for p in range(user_word_offsets[v], user_word_offsets[v + 1], 16):
                prefetch(word_pos, p)
                prefetch(word_len, p)
        a0 = user_action_offsets[u]
        n_act = user_action_offsets[u + 1] - a0
        flat_dst[a * K:(a + n_act) * K] = flat_src[a0 * K:(a0 + n_act) * K]
        w0 = user_word_offsets[u]
        nw = user_word_offsets[u + 1] - w0
        out_pos[w:w + nw] = word_pos[w0:w0 + nw]
        slot = slot_start[b, s]
        end = out_off[w]
        for i in range(nw):
            out_slot[w + i] = slot + i
            end += word_len[w0 + i]
            out_off[w + i + 1] = end
        f0 = flag_start[b, s]
        for i in range(nw):
            f = flags[f0 + i]
            if f == NOT_SELECTED:
                continue
            masked[m] = w + i
            zero[m] = f == SELECTED_ZERO
            m += 1
            r0 = out_off[w + i]
            r1 = out_off[w + i + 1]
            # Labels now, while the rows just copied are in cache; masked words come in order, so every
            # attribute's CSR is appended in order.
            for k in range(K):
                n = n_labels[k]
                if vocab[k] <= STAMP_MAX_VOCAB:
                    base = stamp_base[k]
                    top = vocab[k] - 1
                    for r in range(r0, r1):
                        x = out_attr[r, k]
                        j = base + min(max(x, 0), top)  # clamped: a bad id cannot write outside seen
                        label_ids[k, n] = x
                        n += (seen[j] != m) & (x != 0)  # kept (n advances) only the first time, never 0
                        seen[j] = m
                else:
                    n0 = n
                    for r in range(r0, r1):
                        x = out_attr[r, k]
                        dup = x == 0
                        for q in range(n0, n):
                            dup |= label_ids[k, q] == x
                        label_ids[k, n] = x
                        n += not dup
                n_labels[k] = n
                label_off[k, m] = n
        w += nw
        a += n_act


@dataclass
class CollateConfig:
    select_prob: float = 0.15  # 0 disables masking (fine-tuning, embedding export)
    zero_prob: float = 0.8


class Collator:
    """Builds batches from rows of a TokenizedData.  Picklable, so loader workers can hold one.

    ``collator.packed(users, seed)`` is what a loader worker sends (one buffer); ``collator(users, seed)``
    is the same batch as a :class:`Batch` of views into that buffer.
    """

    def __init__(self, data: TokenizedData, user_attr_offsets: list[int], cfg: CollateConfig | None = None):
        self.data = data
        self.cfg = cfg or CollateConfig()
        self.user_attr_offsets = np.asarray(user_attr_offsets, dtype=np.int32)
        self.n_user_attr = data.user_attr_ids.shape[1]
        # Vocabulary sizes bound the ids (tokenizer contract) and size the label stamp tables.
        self.vocab = [np.asarray(data.manifest["segments"][seg.name]["vocab_sizes"], dtype=np.int64)
                      for seg in data.segments]

    def __call__(self, users: np.ndarray, seed: int = 0) -> Batch:
        return unpack_batch(self.packed(users, seed))

    def packed(self, users: np.ndarray, seed: int = 0) -> PackedBatch:
        users = np.ascontiguousarray(users, dtype=np.int64)
        segs = self.data.segments
        B, U = users.shape[0], self.n_user_attr
        seq_lens, T, flags, flag_start, slot_start = _plan(
            users, tuple(seg.user_word_offsets for seg in segs), U, self.cfg.select_prob, self.cfg.zero_prob, seed)
        sizes = [_segment_sizes(users, seg.user_word_offsets, seg.word_len, seg.user_action_offsets, flags,
                                flag_start, s) for s, seg in enumerate(segs)]

        # Lay the buffer out in flat_tensors order; each segment's label ids go to a scratch region at the
        # end (sized by their bound) and are moved together once their counts are known.
        layout = BufferLayout()
        fixed = [layout.add(torch.int32, (B, U)), layout.add(torch.int32, (B,)), layout.add(torch.int64, (B,))]
        seg_offsets = []
        for (A, W, M, _), seg in zip(sizes, segs, strict=True):
            K = seg.attr_ids.shape[1]
            seg_offsets.append([layout.add(torch.int32, (A, K)), layout.add(torch.int32, (W + 1,)),
                                layout.add(torch.int32, (W,)), layout.add(torch.int64, (W,)),
                                layout.add(torch.int64, (M,)), layout.add(torch.bool, (M,)),
                                layout.add(torch.int32, (K, M + 1))])
        scratch = [layout.add(torch.int32, (seg.attr_ids.shape[1], cap)) for (*_, cap), seg in zip(sizes, segs)]
        buffer = torch.empty(max(layout.nbytes, 1), dtype=torch.uint8)
        raw = buffer.numpy()

        def view(offset: int, dtype, shape: tuple[int, ...]) -> np.ndarray:
            return raw[offset:offset + int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

        ua = view(fixed[0], np.int32, (B, U))
        if U:
            np.add(self.data.user_attr_ids[users], self.user_attr_offsets[None, :], out=ua, casting="unsafe")
        view(fixed[1], np.int32, (B,))[:] = seq_lens
        view(fixed[2], np.int64, (B,))[:] = users

        entries = list(layout.entries[:3])
        labels_at = layout.entries[3 + 7 * len(segs)][2]  # first scratch byte: compacted labels start here
        for s, seg in enumerate(segs):
            A, W, M, cap = sizes[s]
            K = seg.attr_ids.shape[1]
            o = seg_offsets[s]
            label_off = view(o[6], np.int32, (K, M + 1))
            label_ids = view(scratch[s], np.int32, (K, cap))
            _fill_segment(users, seg.user_word_offsets, seg.word_pos, seg.word_len, seg.user_action_offsets,
                          seg.attr_ids, self.vocab[s], slot_start, flags, flag_start, s,
                          view(o[0], np.int32, (A, K)), view(o[1], np.int32, (W + 1,)), view(o[2], np.int32, (W,)),
                          view(o[3], np.int64, (W,)), view(o[4], np.int64, (M,)), view(o[5], np.bool_, (M,)),
                          label_off, label_ids)
            entries += layout.entries[3 + 7 * s:3 + 7 * s + 6]
            entries += [(torch.int32, (M + 1,), o[6] + k * (M + 1) * 4) for k in range(K)]
            for k in range(K):
                nnz = int(label_off[k, M])
                # Moves only ever go down (nnz <= cap), so an earlier move never overwrites later scratch.
                view(labels_at, np.int32, (nnz,))[:] = label_ids[k, :nnz]
                entries.append((torch.int32, (nnz,), labels_at))
                labels_at += nnz * 4
        return PackedBatch(buffer[:labels_at], (tuple(seg.attr_ids.shape[1] for seg in segs), T, tuple(entries)))
