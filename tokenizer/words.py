"""The hot loops: sorting events by (user, time) and cutting them into behavioural words.

Everything here is Numba over flat numpy arrays (no Python per event).  The rules are exactly
those of docs/FORMATS.md §2, and tokenizer/reference.py restates them in plain Python; the tests
require both to agree event for event.

Inputs of one partition of events (any subset of users, all their events of one segment):

- ``uidx``: int64 dense user index 0..N-1 of each event (users ordered by user id)
- ``t_utc``: int64 UTC epoch seconds; ``t_local``: int64 local wall-clock seconds

Outputs are CSR arrays: per user the range of its kept words, per word its position and its
length after the cap, and ``keep``, the indices (into the sorted event order) of kept actions
word after word, so that attribute rows can be gathered once with ``attr_ids[perm[keep]]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

RULE_DAILY = 0
RULE_SESSION = 1
RULE_ACTION = 2  # one action = one word (the paper's "without discretisation" ablation)
RULES = {"daily": RULE_DAILY, "session": RULE_SESSION, "action": RULE_ACTION}
UNIT_DAY = 0
UNIT_HOUR = 1
SECONDS_PER_DAY = 86400


class Words(NamedTuple):
    """Words of every user of a partition, CSR style (N users, W kept words, A kept actions)."""

    user_word_offsets: np.ndarray  # int64 [N+1]  user u owns words user_word_offsets[u]:[u+1]
    user_action_offsets: np.ndarray  # int64 [N+1]  and actions user_action_offsets[u]:[u+1]
    word_pos: np.ndarray  # int32 [W]  position id of each word
    word_len: np.ndarray  # int32 [W]  actions of each word after the cap
    keep: np.ndarray  # int64 [A]  index into the sorted events of each kept action
    words_truncated: int  # words dropped because a user had more than max_words
    actions_capped: int  # actions dropped from kept words by max_actions_per_word


@njit(cache=True, nogil=True)
def user_offsets_from_sorted(uidx_sorted: np.ndarray, n_users: int) -> np.ndarray:
    """int64 [N+1] start of each user's run in events already sorted by user (empty users too)."""
    counts = np.zeros(n_users + 1, np.int64)
    for i in range(uidx_sorted.shape[0]):
        counts[uidx_sorted[i] + 1] += 1
    for u in range(n_users):
        counts[u + 1] += counts[u]
    return counts


def sort_by_user_time(uidx: np.ndarray, t: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of events by (user, time in seconds): (perm int64 [n], user_offsets int64 [N+1])."""
    n = len(uidx)
    t = np.asarray(t, np.int64)
    t0 = int(t.min()) if n else 0
    # The event index rides along as a one-column "code" (its identity table: luts = arange).
    rows, offsets = sort_rows(
        np.ascontiguousarray(uidx, dtype=np.int64), (t - t0) << 32, np.arange(n, dtype=np.int32).reshape(n, 1),
        np.array([0, n], np.int64), np.arange(max(n, 1), dtype=np.int32), np.zeros((1, 1), np.int64), n_users,
    )
    return rows[:, COL_CODES].astype(np.int64), offsets


@njit(cache=True, nogil=True)
def _split_words(
    user_offsets,
    t_utc,
    t_local,
    rule,
    day_start_s,
    gap_s,
    unit,
    window_start_utc,
    window_start_day,
    max_words,
    max_actions,
    split,
):  # pragma: no cover - compiled
    n_users = user_offsets.shape[0] - 1
    n = t_utc.shape[0]
    # Pass 1: where each word starts, and how many words each user has.  With ``split`` a word
    # that reaches max_actions actions ends there and the next action starts a new word.
    word_start = np.empty(n, np.int64)
    user_nwords = np.zeros(n_users, np.int64)
    n_words = 0
    for u in range(n_users):
        s, e = user_offsets[u], user_offsets[u + 1]
        length = 0
        for i in range(s, e):
            if i == s or rule == RULE_ACTION:
                new = True
            elif rule == RULE_DAILY:
                new = (t_local[i] - day_start_s) // SECONDS_PER_DAY != (
                    t_local[i - 1] - day_start_s
                ) // SECONDS_PER_DAY
            else:
                new = (t_utc[i] - t_utc[i - 1]) > gap_s
            if split and length >= max_actions:
                new = True
            if new:
                length = 0
                word_start[n_words] = i
                n_words += 1
                user_nwords[u] += 1
            length += 1

    # Pass 2: keep the last max_words words of each user and the last max_actions of each word.
    user_word_offsets = np.zeros(n_users + 1, np.int64)
    for u in range(n_users):
        user_word_offsets[u + 1] = user_word_offsets[u] + min(user_nwords[u], max_words)
    kept_words = user_word_offsets[n_users]
    word_pos = np.empty(kept_words, np.int32)
    word_len = np.empty(kept_words, np.int32)
    word_end = np.empty(kept_words, np.int64)
    user_action_offsets = np.zeros(n_users + 1, np.int64)
    words_truncated = 0
    actions_capped = 0
    first = 0  # global index of the user's first word
    k = 0
    n_actions = 0
    for u in range(n_users):
        nw = user_nwords[u]
        kw = min(nw, max_words)
        words_truncated += nw - kw
        for j in range(first + nw - kw, first + nw):
            s = word_start[j]
            e = word_start[j + 1] if j + 1 < n_words else n  # words tile the events in order
            length = e - s
            kept = min(length, max_actions)
            actions_capped += length - kept
            # The position is the word's first event's, before the cap.
            if unit == UNIT_HOUR:
                word_pos[k] = (t_utc[s] - window_start_utc) // 3600
            else:
                word_pos[k] = (t_local[s] - day_start_s) // SECONDS_PER_DAY - window_start_day
            word_len[k] = kept
            word_end[k] = e
            n_actions += kept
            k += 1
        user_action_offsets[u + 1] = n_actions
        first += nw

    keep = np.empty(n_actions, np.int64)
    a = 0
    for k in range(kept_words):
        e = word_end[k]
        for i in range(e - word_len[k], e):
            keep[a] = i
            a += 1
    return user_word_offsets, user_action_offsets, word_pos, word_len, keep, words_truncated, actions_capped


def split_words(
    user_offsets: np.ndarray,
    t_utc: np.ndarray,
    t_local: np.ndarray | None,
    *,
    rule: str,
    position_unit: str,
    day_start_hour: int = 4,
    gap_minutes: float = 30.0,
    window_start_utc: int = 0,
    window_start_local: int = 0,
    max_words: int = 128,
    max_actions_per_word: int = 32,
    word_overflow: str = "cap",
) -> Words:
    """Cut events sorted by (user, time) into words (FORMATS.md §2).

    ``rule``: "daily", "session" or "action" (every action its own word).  ``word_overflow``: a word
    with more than ``max_actions_per_word`` actions keeps its last ones ("cap", the paper) or is cut
    into words of that many actions, in time order ("split": no action is dropped).

    ``user_offsets`` (int64 [N+1], from :func:`sort_by_user_time`) must tile ``0..n``.
    ``t_local`` is needed for the daily rule and for day positions (None otherwise).
    """
    t_utc = np.ascontiguousarray(t_utc, dtype=np.int64)
    user_offsets = np.ascontiguousarray(user_offsets, dtype=np.int64)
    if user_offsets.shape[0] < 1 or user_offsets[0] != 0 or user_offsets[-1] != t_utc.shape[0]:
        raise ValueError("user_offsets must start at 0 and end at the number of events")
    if rule not in RULES or word_overflow not in ("cap", "split"):
        raise ValueError(f"rule must be one of {sorted(RULES)} and word_overflow 'cap' or 'split', got "
                         f"{rule!r}, {word_overflow!r}")
    needs_local = rule == "daily" or position_unit == "day"
    if needs_local and t_local is None:
        raise ValueError("t_local is required for the daily rule and for day positions")
    t_local = t_utc if t_local is None else np.ascontiguousarray(t_local, dtype=np.int64)
    day_start_s = int(day_start_hour) * 3600
    window_start_day = (int(window_start_local) - day_start_s) // SECONDS_PER_DAY
    out = _split_words(
        user_offsets,
        t_utc,
        t_local,
        RULES[rule],
        np.int64(day_start_s),
        float(gap_minutes) * 60.0,
        UNIT_HOUR if position_unit == "hour" else UNIT_DAY,
        np.int64(window_start_utc),
        np.int64(window_start_day),
        np.int64(max_words),
        np.int64(max_actions_per_word),
        word_overflow == "split",
    )
    uwo, uao, pos, length, keep, truncated, capped = out
    return Words(uwo, uao, pos, length, keep, int(truncated), int(capped))


# Columns of the sorted event rows (an int32 matrix, one row per event, so that moving an event
# is one contiguous copy): user index, seconds since the segment's window start, microseconds
# within the second, then the K attribute codes.
COL_USER, COL_T, COL_US, COL_CODES = 0, 1, 2, 3


@njit(cache=True, nogil=True)
def sort_rows(
    uidx: np.ndarray,
    when: np.ndarray,
    codes: np.ndarray,
    task_bounds: np.ndarray,
    luts: np.ndarray,
    bases: np.ndarray,
    n_users: int,
):  # pragma: no cover - compiled
    """Events as rows sorted by (user, second), stably: (rows int32 [n, 3+K], user_offsets [N+1]).

    ``when`` is each event's ``second << 32 | microsecond``, seconds counted from the segment's
    window start (the spill format).  Row layout: see COL_*.  Codes become global codes on the
    way (``luts[bases[task, k] + code]``).

    A cache-conscious counting sort: pass 1 scatters rows into at most 256 buckets of
    consecutive users (few write streams: they stay in cache); pass 2 sorts each bucket by user
    inside its own range, and each user's rows by time, while the bucket is in cache.  Moving
    the rows once leaves every later pass (duplicates, words, the final gather) reading memory
    in order.
    """
    n = uidx.shape[0]
    k = codes.shape[1]
    w = COL_CODES + k
    shift = 0
    while (n_users >> shift) > 256:
        shift += 1
    nb = (n_users >> shift) + 1
    bucket = np.zeros(nb + 1, np.int64)
    offsets = np.zeros(n_users + 1, np.int64)
    for i in range(n):
        bucket[(uidx[i] >> shift) + 1] += 1
        offsets[uidx[i] + 1] += 1
    for b in range(nb):
        bucket[b + 1] += bucket[b]
    for u in range(n_users):
        offsets[u + 1] += offsets[u]
    rows = np.empty((n, w), np.int32)
    fill = bucket[:-1].copy()
    for t in range(task_bounds.shape[0] - 1):
        for i in range(task_bounds[t], task_bounds[t + 1]):
            u = uidx[i]
            j = fill[u >> shift]
            fill[u >> shift] = j + 1
            x = when[i]
            rows[j, COL_USER] = u
            rows[j, COL_T] = x >> 32
            rows[j, COL_US] = x & 0xFFFFFFFF
            for q in range(k):
                rows[j, COL_CODES + q] = luts[bases[t, q] + codes[i, q]]
    biggest = 0
    for b in range(nb):
        biggest = max(biggest, bucket[b + 1] - bucket[b])
    scratch = np.empty((biggest, w), np.int32)
    tkey = np.empty(64, np.int64)
    for b in range(nb):
        s, e = bucket[b], bucket[b + 1]
        if e == s:
            continue
        for j in range(e - s):
            for q in range(w):
                scratch[j, q] = rows[s + j, q]
        u_lo = b << shift
        u_hi = min(n_users, (b + 1) << shift)
        fill2 = offsets[u_lo:u_hi].copy()
        for j in range(e - s):  # stable counting sort by user, back into [s, e)
            u = scratch[j, COL_USER]
            d = fill2[u - u_lo]
            fill2[u - u_lo] = d + 1
            for q in range(w):
                rows[d, q] = scratch[j, q]
        for u in range(u_lo, u_hi):  # then each user by time, stably, where out of order
            us, ue = offsets[u], offsets[u + 1]
            ordered = True
            for i in range(us + 1, ue):
                if rows[i, COL_T] < rows[i - 1, COL_T]:
                    ordered = False
                    break
            if ordered:
                continue
            r = ue - us
            if tkey.shape[0] < r:
                tkey = np.empty(2 * r, np.int64)
            # Sort (second, position) packed in one int64: unique keys, so an unstable in-place
            # sort is a stable sort by time (a user's seconds fit 31 bits, its positions 32).
            for a in range(r):
                tkey[a] = (np.int64(rows[us + a, COL_T]) << 32) | a
            tkey[:r].sort()
            for a in range(r):
                src = us + (tkey[a] & 0xFFFFFFFF)
                for q in range(w):
                    scratch[a, q] = rows[src, q]
            for a in range(r):
                for q in range(w):
                    rows[us + a, q] = scratch[a, q]
    return rows, offsets


@njit(cache=True, nogil=True, inline="always")
def _same_event(rows: np.ndarray, a: int, b: int, w: int) -> bool:  # pragma: no cover - compiled
    """Rows a and b (same user and second) are the same event: equal microseconds and codes."""
    for q in range(COL_US, w):
        if rows[a, q] != rows[b, q]:
            return False
    return True


@njit(cache=True, nogil=True)
def sorted_duplicates(user_offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """bool [n]: the sorted event repeats an earlier one of its user: same second and
    microsecond and the same global code in every attribute (rows of :func:`sort_rows`).

    Repeats sit in one run of equal seconds of one user, in input order (the sort is stable),
    so the first of a set of equal events is kept.  Short runs are compared pairwise; long ones
    (many events in one second) through a hash of the event, so the cost stays linear.
    """
    n = rows.shape[0]
    w = rows.shape[1]
    dup = np.zeros(n, np.bool_)
    for u in range(user_offsets.shape[0] - 1):
        s, e = user_offsets[u], user_offsets[u + 1]
        i = s
        while i < e:
            j = i + 1
            while j < e and rows[j, COL_T] == rows[i, COL_T]:
                j += 1
            r = j - i
            if r > 1 and r <= 48:
                for b in range(i + 1, j):
                    for a in range(i, b):
                        if not dup[a] and _same_event(rows, a, b, w):
                            dup[b] = True
                            break
            elif r > 48:
                hv = np.empty(r, np.uint64)
                for b in range(i, j):
                    x = np.uint64(0x9E3779B97F4A7C15)
                    for q in range(COL_US, w):
                        x = (x ^ np.uint64(rows[b, q] & 0xFFFFFFFF)) * np.uint64(0xBF58476D1CE4E5B9)
                        x ^= x >> np.uint64(29)
                    hv[b - i] = x
                order = np.argsort(hv, kind="mergesort")  # equal hashes keep their sorted order
                g = 0
                while g < r:
                    h_end = g + 1
                    while h_end < r and hv[order[h_end]] == hv[order[g]]:
                        h_end += 1
                    for b2 in range(g + 1, h_end):
                        pb = i + order[b2]
                        for a2 in range(g, b2):
                            pa_ = i + order[a2]
                            if not dup[pa_] and _same_event(rows, pa_, pb, w):
                                dup[pb] = True
                                break
                    g = h_end
            i = j
    return dup


@njit(cache=True, nogil=True)
def drop_rows(
    user_offsets: np.ndarray, rows: np.ndarray, drop: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """(rows, user_offsets) without the sorted rows marked in ``drop`` (compacted in place)."""
    n_users = user_offsets.shape[0] - 1
    offsets = np.zeros(n_users + 1, np.int64)
    m = 0
    for u in range(n_users):
        for i in range(user_offsets[u], user_offsets[u + 1]):
            if not drop[i]:
                if m != i:
                    for q in range(rows.shape[1]):
                        rows[m, q] = rows[i, q]
                m += 1
        offsets[u + 1] = m
    return rows[:m], offsets


@njit(cache=True, nogil=True)
def row_seconds(rows: np.ndarray, t0: int) -> np.ndarray:  # pragma: no cover - compiled
    """int64 UTC seconds of sorted rows."""
    out = np.empty(rows.shape[0], np.int64)
    for i in range(rows.shape[0]):
        out[i] = rows[i, COL_T] + t0
    return out


@njit(cache=True, nogil=True)
def gather_sorted_ids(
    rows: np.ndarray, keep: np.ndarray, ids: np.ndarray, bases: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """int32 [A, K]: vocabulary ids of the kept sorted rows, ``ids[bases[k] + code k of row keep[a]]``."""
    k = rows.shape[1] - COL_CODES
    out = np.empty((keep.shape[0], k), np.int32)
    for a in range(keep.shape[0]):
        r = keep[a]
        for q in range(k):
            out[a, q] = ids[bases[q] + rows[r, COL_CODES + q]]
    return out


@njit(cache=True, nogil=True)
def apply_task_luts(
    codes: np.ndarray, task_bounds: np.ndarray, luts: np.ndarray, bases: np.ndarray
) -> None:  # pragma: no cover - compiled
    """In place: codes[r, k] = luts[bases[t, k] + codes[r, k]] for the rows r of task t."""
    for t in range(task_bounds.shape[0] - 1):
        for r in range(task_bounds[t], task_bounds[t + 1]):
            for k in range(codes.shape[1]):
                codes[r, k] = luts[bases[t, k] + codes[r, k]]


@njit(cache=True, nogil=True)
def gather_ids(
    codes: np.ndarray, perm: np.ndarray, keep: np.ndarray, ids: np.ndarray, bases: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """int32 [A, K]: vocabulary ids of the kept actions, ``ids[bases[k] + codes[perm[keep[a]], k]]``."""
    out = np.empty((keep.shape[0], codes.shape[1]), np.int32)
    for a in range(keep.shape[0]):
        r = perm[keep[a]]
        for k in range(codes.shape[1]):
            out[a, k] = ids[bases[k] + codes[r, k]]
    return out
