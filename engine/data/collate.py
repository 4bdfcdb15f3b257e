"""Collate: users -> one packed batch buffer, with masking and CSR multi-hot labels, in Numba.

The inputs are the tokenized arrays of :class:`tokenizer.shards.TokenizedData` (CSR, no padding);
the output is a :class:`engine.data.batch.PackedBatch`: every tensor of the batch (FORMATS.md §5) written
straight into one aligned buffer, which the trainer reads as views (on a GPU after one copy)
(:meth:`Collator.__call__` returns those views as a :class:`engine.data.batch.Batch`).  Every loop that
touches words or actions is an ``@njit`` function: collate runs once per step for every user in the
batch and must never be what a GPU waits for.

Two passes over the batch's users: :func:`_plan` (sequence lengths, grid slots, the masked words,
and how large each array is; :func:`_layout` then places the arrays in the buffer), and
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

from engine.data.batch import ALIGN, Batch, PackedBatch, unpack_batch
from engine.data.intrinsics import copy_items, prefetch

if TYPE_CHECKING:
    from tokenizer.shards import TokenizedData

NOT_SELECTED, SELECTED_KEEP, SELECTED_ZERO = 0, 1, 2
STAMP_MAX_VOCAB = 1 << 22  # a stamp table of 4M uint16 (8 MiB) per attribute is the most worth allocating per batch


@njit(cache=True, inline="always")
def _splitmix64(state):
    """(next state, 64 random bits): SplitMix64, one multiply-xorshift mix per draw."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _plan(users, user_word_offsets, user_action_offsets, n_user_attr, select_prob, zero_prob, seed):
    """Sequence lengths, grid layout, mask flags and array sizes of a batch.

    users: int64 [B] dataset rows; user_word_offsets, user_action_offsets: tuples of S int64 [N+1] (one
    per segment).
    Returns seq_lens int32 [B], T (the grid's padded length), flags int8 [sum of words] (user-major,
    then segment, then word), flag_start int64 [B, S] (where user b's flags of segment s begin),
    slot_start int64 [B, S] (flat grid index of user b's first word of segment s) and sizes int64 [S, 3]:
    per segment (actions, words, masked words).
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
    sizes = np.zeros((S, 3), dtype=np.int64)
    s = 0
    for actions in user_action_offsets:
        for b in range(B):
            sizes[s, 0] += actions[users[b] + 1] - actions[users[b]]
            sizes[s, 1] += n_words[b, s]
        s += 1
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
                t = np.int64(((r >> np.uint64(32)) * np.uint64(j + 1)) >> np.uint64(32))
                if flags[start + t] != NOT_SELECTED:
                    t = j
                flags[start + t] = SELECTED_ZERO if (r & low32) < zero_below else SELECTED_KEEP
                seg = 0  # count it in its segment, for the buffer's layout
                while t >= n_words[b, seg]:
                    t -= n_words[b, seg]
                    seg += 1
                sizes[seg, 2] += 1
    return seq_lens, T, flags, flag_start, slot_start, sizes


@njit(cache=True, inline="always")
def _reserve(end, nbytes):
    """(offset, new end): room for ``nbytes``, the next array starting on an ALIGN boundary (as in
    engine.data.batch.BufferLayout)."""
    return end, end + (nbytes + ALIGN - 1) // ALIGN * ALIGN


@njit(cache=True, nogil=True)
def _layout(sizes, n_attrs, B, U):
    """Byte offsets of every array of the batch buffer, in flat_tensors order, then the label scratch.

    sizes: int64 [S, 3] from :func:`_plan`; n_attrs: int64 [S] (K per segment).  Returns fixed int64 [3]
    (user_attr_ids int32 [B, U], seq_lens int32 [B], users int64 [B]), at int64 [S, 8] (the arrays of
    :func:`_fill_segment`), the scratch's first byte and the buffer's size.  The scratch has room for one
    label per action and attribute, a bound that needs no look at the words; pages of it that are never
    written are never touched.
    """
    S = sizes.shape[0]
    fixed = np.empty(3, dtype=np.int64)
    at = np.empty((S, 8), dtype=np.int64)
    end = 0
    fixed[0], end = _reserve(end, B * U * 4)
    fixed[1], end = _reserve(end, B * 4)
    fixed[2], end = _reserve(end, B * 8)
    for s in range(S):
        A, W, M, K = sizes[s, 0], sizes[s, 1], sizes[s, 2], n_attrs[s]
        at[s, 0], end = _reserve(end, A * K * 4)
        at[s, 1], end = _reserve(end, (W + 1) * 4)
        at[s, 2], end = _reserve(end, W * 4)
        at[s, 3], end = _reserve(end, W * 8)
        at[s, 4], end = _reserve(end, M * 8)
        at[s, 5], end = _reserve(end, M)
        at[s, 6], end = _reserve(end, K * (M + 1) * 4)
    scratch = end
    for s in range(S):
        at[s, 7], end = _reserve(end, sizes[s, 0] * n_attrs[s] * 4)
    return fixed, at, scratch, max(end, 1)


@njit(cache=True, nogil=True)
def _fill_users(raw, fixed, users, user_attr_ids, user_attr_offsets, seq_lens):
    """The per-user arrays: user-attribute ids (offset into the stacked table), sequence lengths, rows."""
    B = users.shape[0]
    U = user_attr_ids.shape[1]
    ua = raw[fixed[0]:fixed[0] + B * U * 4].view(np.int32)
    lens = raw[fixed[1]:fixed[1] + B * 4].view(np.int32)
    rows = raw[fixed[2]:fixed[2] + B * 8].view(np.int64)
    for b in range(B):
        for j in range(U):
            ua[b * U + j] = user_attr_ids[users[b], j] + user_attr_offsets[j]
        lens[b] = seq_lens[b]
        rows[b] = users[b]


@njit(cache=True, inline="always")
def _take_stamped(x, k, label_ids, n_labels, seen, base, top, stamp):
    """Append id ``x`` to attribute k's labels of the current masked word unless it is 0 or already there."""
    n = n_labels[k]
    label_ids[k, n] = x  # written always, kept (n advances) only if new and nonzero
    j = base[k] + min(max(x, 0), top[k])  # clamped: a bad id cannot write outside seen
    n_labels[k] = n + ((seen[j] != stamp) & (x != 0))
    seen[j] = stamp


@njit(cache=True, nogil=True)
def _fill_segment(users, user_word_offsets, word_pos, word_len, user_action_offsets, attr_ids, vocab,
                  slot_start, flags, flag_start, s, raw, at, size, labels_at, counts):
    """Write segment ``s`` of the batch into the uint8 buffer ``raw``.

    vocab: int64 [K] vocabulary size of each attribute.  at: int64 [8] byte offsets of the arrays
    (attr_ids int32 [A, K], word_offsets int32 [W+1], word_pos int32 [W], word_slot int64 [W], masked
    int64 [M], masked_zero bool [M], label_offsets int32 [K, M+1], label scratch int32 [K, A]);
    size: (A, W, M) from :func:`_plan`.  Attribute k's labels end up at ``labels_at`` + the counts of the
    attributes before it, back to back; counts int64 [K] receives each attribute's label count.  Returns the
    byte offset after the last label.
    """
    A, W, M = size[0], size[1], size[2]
    K = attr_ids.shape[1]
    out_attr = raw[at[0]:at[0] + A * K * 4].view(np.int32).reshape((A, K))
    out_off = raw[at[1]:at[1] + (W + 1) * 4].view(np.int32)
    out_pos = raw[at[2]:at[2] + W * 4].view(np.int32)
    out_slot = raw[at[3]:at[3] + W * 8].view(np.int64)
    masked = raw[at[4]:at[4] + M * 8].view(np.int64)
    zero = raw[at[5]:at[5] + M].view(np.bool_)
    label_off = raw[at[6]:at[6] + K * (M + 1) * 4].view(np.int32).reshape((K, M + 1))
    label_ids = raw[at[7]:at[7] + K * A * 4].view(np.int32).reshape((K, A))
    B = users.shape[0]
    # Stamps: seen[base[k] + id] == stamp once attribute k's id was taken for the current masked word.  Every
    # word gets a new stamp, so the table is only cleared when the 16-bit stamps wrap (uint16: half the
    # cache footprint of int32, which the random lookups into a shop-sized table feel).
    # Attributes with larger vocabularies (no table) are checked by a scan of the word's labels so far.
    stamped = np.array([k for k in range(K) if vocab[k] <= STAMP_MAX_VOCAB], dtype=np.int64)
    scanned = np.array([k for k in range(K) if vocab[k] > STAMP_MAX_VOCAB], dtype=np.int64)
    top = vocab - 1
    base = np.zeros(K, dtype=np.int64)
    size = 0
    for k in stamped:
        base[k] = size
        size += vocab[k]
    seen = np.zeros(size if M else 0, dtype=np.uint16)
    stamp = np.uint16(0)
    word_start = np.zeros(K, dtype=np.int64)
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
        copy_items(flat_dst, a * K, flat_src, a0 * K, n_act * K)  # memcpy: Numba's slice copy is slower
        w0 = user_word_offsets[u]
        nw = user_word_offsets[u + 1] - w0
        copy_items(out_pos, w, word_pos, w0, nw)
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
            if stamp == np.uint16(65535):
                seen[:] = 0
                stamp = np.uint16(0)
            stamp += np.uint16(1)
            # Labels now, while the rows just copied are in cache; masked words come in order, so every
            # attribute's CSR is appended in order.  Row by row, all K attributes of a row together.
            for k in scanned:
                word_start[k] = n_labels[k]
            r0 = out_off[w + i]
            r1 = out_off[w + i + 1]
            if r1 - r0 == 1:  # one action (~40% of long-term words): no repeats, no stamps needed
                for k in range(K):
                    x = out_attr[r0, k]
                    n = n_labels[k]
                    label_ids[k, n] = x
                    n_labels[k] = n + (x != 0)
            elif scanned.shape[0] == 0:  # the usual case: a plain range over K compiles to the tighter loop
                for r in range(r0, r1):
                    for k in range(K):
                        _take_stamped(out_attr[r, k], k, label_ids, n_labels, seen, base, top, stamp)
            else:
                for r in range(r0, r1):
                    for k in stamped:
                        _take_stamped(out_attr[r, k], k, label_ids, n_labels, seen, base, top, stamp)
                for k in scanned:
                    n = n_labels[k]
                    for r in range(r0, r1):
                        x = out_attr[r, k]
                        dup = x == 0
                        for q in range(word_start[k], n):
                            dup |= label_ids[k, q] == x
                        label_ids[k, n] = x
                        n += not dup
                    n_labels[k] = n
            for k in range(K):
                label_off[k, m] = n_labels[k]
        w += nw
        a += n_act
    # Move the label lists together.  Each move goes down (count <= A, labels_at <= scratch), and ends
    # before the next attribute's scratch row begins, so nothing is overwritten before it is moved.
    for k in range(K):
        n = n_labels[k]
        counts[k] = n
        dst = raw[labels_at:labels_at + n * 4].view(np.int32)
        for i in range(n):
            dst[i] = label_ids[k, i]
        labels_at += n * 4
    return labels_at


@dataclass
class CollateConfig:
    select_prob: float = 0.15  # 0 disables masking (fine-tuning, embedding export)
    zero_prob: float = 0.8


class Collator:
    """Builds batches from rows of a TokenizedData.  Safe to call from several threads at once.

    ``collator.packed(users, seed)`` is what a loader thread hands over (one buffer); ``collator(users, seed)``
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
        # The Numba passes copy rows with memcpy: every array must be contiguous (no copy when it already is).
        self._segments = [tuple(np.ascontiguousarray(a) for a in (seg.user_word_offsets, seg.word_pos, seg.word_len,
                                                                   seg.user_action_offsets, seg.attr_ids))
                          for seg in data.segments]
        self._user_word_offsets = tuple(arrays[0] for arrays in self._segments)
        self._user_action_offsets = tuple(arrays[3] for arrays in self._segments)
        self._n_attrs = tuple(seg.attr_ids.shape[1] for seg in data.segments)
        self._n_attrs_array = np.array(self._n_attrs, dtype=np.int64)

    def __call__(self, users: np.ndarray, seed: int = 0) -> Batch:
        return unpack_batch(self.packed(users, seed))

    def packed(self, users: np.ndarray, seed: int = 0) -> PackedBatch:
        users = np.ascontiguousarray(users, dtype=np.int64)
        B, U, Ks = users.shape[0], self.n_user_attr, self._n_attrs
        if B and not (0 <= users.min() and users.max() < self.data.user_attr_ids.shape[0]):
            # The Numba passes do not check bounds: a bad row would read outside the arrays.
            raise IndexError(f"collate: user rows must lie in [0, {self.data.user_attr_ids.shape[0]}); "
                             f"got {users.min()}..{users.max()}")
        seq_lens, T, flags, flag_start, slot_start, sizes = _plan(
            users, self._user_word_offsets, self._user_action_offsets, U, self.cfg.select_prob, self.cfg.zero_prob,
            seed)
        # flat_tensors order; each segment's label ids go to a scratch region at the end and are moved up
        # against each other once their counts are known.
        fixed, at, labels_at, nbytes = _layout(sizes, self._n_attrs_array, B, U)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        raw = buffer.numpy()
        _fill_users(raw, fixed, users, self.data.user_attr_ids, self.user_attr_offsets, seq_lens)
        counts = np.zeros((len(Ks), max(Ks, default=0)), dtype=np.int64)
        starts = []
        for s, arrays in enumerate(self._segments):
            starts.append(labels_at)
            labels_at = _fill_segment(users, *arrays, self.vocab[s], slot_start, flags, flag_start, s, raw, at[s],
                                      sizes[s], labels_at, counts[s])

        # The spec: (dtype, shape, byte offset) of every tensor, in flat_tensors order.
        f0, f1, f2 = fixed.tolist()
        entries = [(torch.int32, (B, U), f0), (torch.int32, (B,), f1), (torch.int64, (B,), f2)]
        for (A, W, M), o, K, n, start in zip(sizes.tolist(), at.tolist(), Ks, counts.tolist(), starts, strict=True):
            entries += [(torch.int32, (A, K), o[0]), (torch.int32, (W + 1,), o[1]), (torch.int32, (W,), o[2]),
                        (torch.int64, (W,), o[3]), (torch.int64, (M,), o[4]), (torch.bool, (M,), o[5])]
            entries += [(torch.int32, (M + 1,), o[6] + k * (M + 1) * 4) for k in range(K)]
            for c in n[:K]:
                entries.append((torch.int32, (c,), start))
                start += c * 4
        return PackedBatch(buffer[:labels_at], (Ks, T, tuple(entries)))
