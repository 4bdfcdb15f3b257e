"""The Numba word code against the pure-Python reference: exact equality, event for event.

Every case runs the fast path (timecols.local_seconds -> words.sort_by_user_time -> words.split_words)
and tokenizer/reference.py on the same events, and compares each user's words as
(position, [input indices of the kept actions]).  Edge cases also carry hand-written expectations,
so that a mistake shared by both implementations would still show.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import pytest

from tokenizer import reference
from tokenizer.timecols import local_seconds
from tokenizer.words import sort_by_user_time, split_words, user_offsets_from_sorted

BERLIN = "Europe/Berlin"
TOKYO = "Asia/Tokyo"


def utc(s: str, tz: str = "UTC") -> int:
    """Epoch seconds of an ISO wall-clock time in ``tz``."""
    return int(dt.datetime.fromisoformat(s).replace(tzinfo=zoneinfo.ZoneInfo(tz)).timestamp())


def fast_words(users, times, n_users=None, **rules):
    """{user: [(pos, [input index, ...]), ...]} from the Numba path (users are 0..n_users-1)."""
    uidx = np.asarray(users, dtype=np.int64)
    t = np.asarray(times, dtype=np.int64)
    n_users = int(uidx.max()) + 1 if n_users is None else n_users
    perm, offsets = sort_by_user_time(uidx, t, n_users)
    tz = rules.pop("timezone")
    ws = rules.pop("window_start_utc")
    words = split_words(
        offsets,
        t[perm],
        local_seconds(t[perm], tz),
        window_start_utc=ws,
        window_start_local=int(local_seconds(np.array([ws]), tz)[0]),
        **rules,
    )
    out = {}
    for u in range(n_users):
        w0, w1 = words.user_word_offsets[u], words.user_word_offsets[u + 1]
        a = words.user_action_offsets[u]
        user = []
        for w in range(w0, w1):
            n = words.word_len[w]
            user.append((int(words.word_pos[w]), [int(perm[k]) for k in words.keep[a : a + n]]))
            a += n
        assert a == words.user_action_offsets[u + 1]
        if user:
            out[u] = user
    return out, words


def ref_words(users, times, **rules):
    return reference.all_words([int(u) for u in users], [int(t) for t in times], **rules)


def check(users, times, n_users=None, **rules):
    fast, words = fast_words(users, times, n_users, **dict(rules))
    ref = ref_words(users, times, **rules)
    assert fast == ref
    return fast, words


DAILY = dict(rule="daily", position_unit="day", day_start_hour=4, max_words=128, max_actions_per_word=32)
SESSION = dict(rule="session", position_unit="hour", gap_minutes=30.0, max_words=128, max_actions_per_word=32)


# -- random logs --------------------------------------------------------------------------------
def random_log(rng: np.random.Generator, n: int, n_users: int, start: int, span: int):
    """Users with bursts of events: gaps of exactly 30 min, 30 min + 1 s, duplicates, long breaks."""
    users = rng.integers(0, n_users, n)
    times = np.empty(n, np.int64)
    gaps = np.array([0, 0, 1, 59, 1799, 1800, 1801, 3600, 5 * 3600, 86400, 3 * 86400])
    last = {}
    for i, u in enumerate(users):
        if u not in last or rng.random() < 0.05:
            last[u] = start + int(rng.integers(0, span))
        else:
            last[u] += int(rng.choice(gaps))
        # Some events out of order, to exercise the sort.
        times[i] = last[u] - (int(rng.integers(0, 7200)) if rng.random() < 0.1 else 0)
    return users, times


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tz", [BERLIN, TOKYO, "UTC"])
def test_random_logs_match_reference(seed, tz):
    rng = np.random.default_rng(seed)
    start = utc("2026-03-20T00:00:00", tz)
    users, times = random_log(rng, 1500, 40, start, 20 * 86400)
    times = np.maximum(times, start)  # the pipeline drops earlier rows; keep positions >= 0
    caps = dict(max_words=int(rng.integers(1, 12)), max_actions_per_word=int(rng.integers(1, 6)))
    for rules in (DAILY, SESSION, dict(SESSION, position_unit="day"), dict(DAILY, position_unit="hour")):
        rules = dict(rules, **caps)
        if rules["rule"] == "daily":
            rules["day_start_hour"] = int(rng.integers(0, 24))
        check(users, times, timezone=tz, window_start_utc=start, n_users=45, **rules)


def test_random_logs_counts_are_consistent():
    rng = np.random.default_rng(7)
    start = utc("2026-01-01T00:00:00")
    users, times = random_log(rng, 3000, 50, start, 30 * 86400)
    full, w_full = fast_words(
        users,
        times,
        timezone="UTC",
        window_start_utc=start,
        **dict(SESSION, max_words=10**6, max_actions_per_word=10**6),
    )
    _, w = fast_words(
        users,
        times,
        timezone="UTC",
        window_start_utc=start,
        **dict(SESSION, max_words=4, max_actions_per_word=2),
    )
    n_words_full = len(w_full.word_pos)
    assert w_full.words_truncated == 0 and w_full.actions_capped == 0
    assert len(w_full.keep) == len(users)
    assert len(w.word_pos) + w.words_truncated == n_words_full
    kept_full = {u: words[-4:] for u, words in full.items()}
    dropped_by_truncation = sum(len(a) for words in full.values() for _, a in words[:-4])
    capped = sum(max(0, len(a) - 2) for words in kept_full.values() for _, a in words)
    assert w.actions_capped == capped
    assert len(w.keep) + capped + dropped_by_truncation == len(users)


# -- edge cases -----------------------------------------------------------------------------------
def test_empty_input_and_empty_users():
    fast, words = check([], [], n_users=3, timezone="UTC", window_start_utc=0, **DAILY)
    assert fast == {}
    assert words.user_word_offsets.tolist() == [0, 0, 0, 0]
    assert words.user_action_offsets.tolist() == [0, 0, 0, 0]
    # Users 0 and 2 have no events between users with events.
    fast, words = check([1, 3], [100, 200], n_users=5, timezone="UTC", window_start_utc=0, **SESSION)
    assert words.user_word_offsets.tolist() == [0, 0, 1, 1, 2, 2]
    assert fast == {1: [(0, [0])], 3: [(0, [1])]}


def test_single_event():
    t = utc("2026-01-02T05:00:00", TOKYO)
    ws = utc("2026-01-01T00:00:00", TOKYO)
    fast, _ = check([0], [t], timezone=TOKYO, window_start_utc=ws, **DAILY)
    # Window starts at 00:00 local: before 04:00, so it lies in day "Dec 31"; Jan 2 05:00 is day +2.
    assert fast == {0: [(2, [0])]}


def test_equal_timestamps_keep_input_order_and_cap_keeps_last():
    t = utc("2026-01-01T12:00:00")
    users = [0, 0, 0, 0, 0]
    times = [t, t, t - 10, t, t]
    fast, words = check(
        users, times, timezone="UTC", window_start_utc=t - 3600, **dict(SESSION, max_actions_per_word=3)
    )
    # Time order, ties by input order: 2, 0, 1, 3, 4; the cap keeps the last three.
    assert fast == {0: [(0, [1, 3, 4])]}  # position of the first event (t - 10), before the cap
    assert words.actions_capped == 2


@pytest.mark.parametrize("tz", [TOKYO, BERLIN])
def test_day_boundary_at_0400(tz):
    ws = utc("2026-01-01T00:00:00", tz)
    times = [utc("2026-01-05T03:59:59", tz), utc("2026-01-05T04:00:00", tz), utc("2026-01-06T03:59:59", tz)]
    fast, _ = check([0, 0, 0], times, timezone=tz, window_start_utc=ws, **DAILY)
    # 03:59:59 belongs to Jan 4's word (position 4: the window's day is Dec 31), 04:00 opens Jan 5.
    assert fast == {0: [(4, [0]), (5, [1, 2])]}


def test_day_boundary_across_dst_in_berlin():
    """On 2026-03-29 Berlin moves from UTC+1 to UTC+2 at 02:00; the word boundary stays 04:00 local."""
    ws = utc("2026-03-25T00:00:00", BERLIN)
    times = [
        utc("2026-03-29T01:59:59", BERLIN),  # before the switch (CET)
        utc("2026-03-29T03:30:00", BERLIN),  # after it (CEST): still the 28th's word
        utc("2026-03-29T03:59:59", BERLIN),  # = 01:59:59 UTC, last second of the 28th's word
        utc("2026-03-29T04:00:00", BERLIN),  # = 02:00:00 UTC, first second of the 29th's word
        utc("2026-10-25T03:59:59", BERLIN),  # autumn: back to UTC+1 at 03:00 CEST
        utc("2026-10-25T04:00:00", BERLIN),  # = 03:00:00 UTC
    ]
    assert times[3] - times[2] == 1
    assert times[3] == utc("2026-03-29T02:00:00")
    assert times[5] == utc("2026-10-25T03:00:00")
    fast, _ = check([0] * 6, times, timezone=BERLIN, window_start_utc=ws, **DAILY)
    # Days since Mar 24 (the window's 04:00 day): Mar 28 -> 4, Mar 29 -> 5, Oct 24 -> 214, Oct 25 -> 215.
    assert fast == {0: [(4, [0, 1, 2]), (5, [3]), (214, [4]), (215, [5])]}
    # A naive UTC+1 rule would put the boundary at 03:00 UTC on the 29th and merge events 2 and 3.


def test_session_gap_exactly_30_minutes_continues():
    t0 = utc("2026-01-01T10:00:00")
    times = [t0, t0 + 1800, t0 + 3600 + 1, t0 + 5401, t0 + 5401 + 1800 + 1]
    fast, _ = check([0] * 5, times, timezone="UTC", window_start_utc=utc("2026-01-01T00:00:00"), **SESSION)
    # 1800 s continues; 1801 s starts a new word; positions are hours since the window start.
    assert fast == {0: [(10, [0, 1]), (11, [2, 3]), (12, [4])]}


def test_truncation_keeps_last_words_and_cap_keeps_position():
    t0 = utc("2026-01-01T00:00:00")
    times = [t0 + h * 7200 + s for h in range(6) for s in (0, 1, 2)]  # 6 sessions of 3 events
    users = [0] * len(times)
    fast, words = check(
        users,
        times,
        timezone="UTC",
        window_start_utc=t0,
        **dict(SESSION, max_words=4, max_actions_per_word=2),
    )
    assert fast == {0: [(2 * h, [3 * h + 1, 3 * h + 2]) for h in range(2, 6)]}
    assert words.words_truncated == 2
    assert words.actions_capped == 4


def test_unsorted_input_is_sorted_stably_by_user_then_time():
    rng = np.random.default_rng(3)
    for n, n_users in ((0, 1), (1, 1), (500, 7), (2000, 300)):
        users = rng.integers(0, n_users, n)
        times = rng.integers(0, 50, n)  # many ties
        perm, offsets = sort_by_user_time(users.astype(np.int64), times.astype(np.int64), n_users)
        np.testing.assert_array_equal(perm, np.lexsort((times, users)))
        np.testing.assert_array_equal(
            offsets, user_offsets_from_sorted(users[perm].astype(np.int64), n_users)
        )
        np.testing.assert_array_equal(np.diff(offsets), np.bincount(users, minlength=n_users))


def test_times_before_1970_floor_correctly():
    # Negative epoch seconds: day keys and hour positions must floor, not truncate toward zero.
    times = [-86400 - 1, -86400, -1, 0]
    fast, _ = check(
        [0] * 4, times, timezone="UTC", window_start_utc=-2 * 86400, **dict(DAILY, day_start_hour=0)
    )
    assert fast == {0: [(0, [0]), (1, [1, 2]), (2, [3])]}
    fast, _ = check(
        [0] * 4, times, timezone="UTC", window_start_utc=-2 * 86400, **dict(SESSION, gap_minutes=0.5)
    )
    assert fast == {0: [(23, [0, 1]), (47, [2, 3])]}


def test_split_words_validates_offsets():
    with pytest.raises(ValueError, match="user_offsets"):
        split_words(np.array([0, 2]), np.zeros(3, np.int64), None, rule="session", position_unit="hour")
    with pytest.raises(ValueError, match="t_local"):
        split_words(np.array([0, 3]), np.zeros(3, np.int64), None, rule="daily", position_unit="day")
