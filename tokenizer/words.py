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


@njit(cache=True)
def user_offsets_from_sorted(uidx_sorted: np.ndarray, n_users: int) -> np.ndarray:
    """int64 [N+1] start of each user's run in events already sorted by user (empty users too)."""
    counts = np.zeros(n_users + 1, np.int64)
    for i in range(uidx_sorted.shape[0]):
        counts[uidx_sorted[i] + 1] += 1
    for u in range(n_users):
        counts[u + 1] += counts[u]
    return counts


@njit(cache=True)
def sort_by_user_time(uidx: np.ndarray, t: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of events by (user, time): (perm int64 [n], user_offsets int64 [N+1]).

    A counting sort by user (stable, O(n + N)) and then, per user, a stable mergesort by time
    only where that user's events are out of order.  Logs mostly arrive in time order, so the
    second step is usually a scan; this beats a global stable argsort of an (user, time) key by
    a wide margin and keeps equal timestamps in input order, as FORMATS.md requires.
    """
    n = uidx.shape[0]
    offsets = user_offsets_from_sorted(uidx, n_users)  # counts by user -> starts (same thing)
    fill = offsets[:-1].copy()
    perm = np.empty(n, np.int64)
    for i in range(n):
        u = uidx[i]
        perm[fill[u]] = i
        fill[u] += 1
    for u in range(n_users):
        s, e = offsets[u], offsets[u + 1]
        ordered = True
        for i in range(s + 1, e):
            if t[perm[i]] < t[perm[i - 1]]:
                ordered = False
                break
        if not ordered:
            seg = perm[s:e].copy()
            order = np.argsort(t[seg], kind="mergesort")
            for j in range(e - s):
                perm[s + j] = seg[order[j]]
    return perm, offsets


@njit(cache=True)
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
):  # pragma: no cover - compiled
    n_users = user_offsets.shape[0] - 1
    n = t_utc.shape[0]
    # Pass 1: where each word starts, and how many words each user has.
    word_start = np.empty(n, np.int64)
    user_nwords = np.zeros(n_users, np.int64)
    n_words = 0
    for u in range(n_users):
        s, e = user_offsets[u], user_offsets[u + 1]
        for i in range(s, e):
            if i == s:
                new = True
            elif rule == RULE_DAILY:
                new = (t_local[i] - day_start_s) // SECONDS_PER_DAY != (
                    t_local[i - 1] - day_start_s
                ) // SECONDS_PER_DAY
            else:
                new = (t_utc[i] - t_utc[i - 1]) > gap_s
            if new:
                word_start[n_words] = i
                n_words += 1
                user_nwords[u] += 1

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
) -> Words:
    """Cut events sorted by (user, time) into words (FORMATS.md §2).

    ``user_offsets`` (int64 [N+1], from :func:`sort_by_user_time`) must tile ``0..n``.
    ``t_local`` is needed for the daily rule and for day positions (None otherwise).
    """
    t_utc = np.ascontiguousarray(t_utc, dtype=np.int64)
    user_offsets = np.ascontiguousarray(user_offsets, dtype=np.int64)
    if user_offsets.shape[0] < 1 or user_offsets[0] != 0 or user_offsets[-1] != t_utc.shape[0]:
        raise ValueError("user_offsets must start at 0 and end at the number of events")
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
        RULE_DAILY if rule == "daily" else RULE_SESSION,
        np.int64(day_start_s),
        float(gap_minutes) * 60.0,
        UNIT_HOUR if position_unit == "hour" else UNIT_DAY,
        np.int64(window_start_utc),
        np.int64(window_start_day),
        np.int64(max_words),
        np.int64(max_actions_per_word),
    )
    uwo, uao, pos, length, keep, truncated, capped = out
    return Words(uwo, uao, pos, length, keep, int(truncated), int(capped))


@njit(cache=True)
def gather_rows(table: np.ndarray, perm: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``table[perm[keep]]`` for an int32 [n, K] table, without the intermediate index array."""
    out = np.empty((keep.shape[0], table.shape[1]), np.int32)
    for a in range(keep.shape[0]):
        r = perm[keep[a]]
        for k in range(table.shape[1]):
            out[a, k] = table[r, k]
    return out
