"""The tokenizer's compiled building blocks against plain-Python restatements.

User hashes against tokenizer/reference.py, hash tables against dicts, the UTF-8 check against
Python's decoder, the ISO 8601 parser against datetime.fromisoformat, the time-zone table
against zoneinfo, the duplicate finder against a set, and the user-count sketch against the
true count.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import reference
from tokenizer.hashing import (
    IntTable,
    StrTable,
    hash_ids,
    hll_estimate,
    hll_update,
    string_buffers,
    top_bits,
    utf8_invalid,
)
from tokenizer.timecols import T_BAD, local_seconds, offset_table, to_micros
from tokenizer.words import (
    COL_CODES,
    COL_T,
    COL_US,
    COL_USER,
    drop_rows,
    sort_by_user_time,
    sort_rows,
    sorted_duplicates,
)


def test_user_hash_matches_reference():
    ints = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012]
    got = hash_ids(pa.array(ints, pa.int64()))
    assert got.tolist() == [reference.user_hash(u) for u in ints]
    strs = ["", "a", "user-17", "日本語", "é" * 40]
    arr = pa.array(strs)
    assert hash_ids(arr).tolist() == [reference.user_hash(u) for u in strs]
    assert hash_ids(arr.cast(pa.large_string())).tolist() == hash_ids(arr).tolist()
    assert hash_ids(arr.slice(2)).tolist() == hash_ids(arr)[2:].tolist()  # offsets respected
    assert top_bits(got, 3).tolist() == [reference.shard_of(u, 3) for u in ints]
    assert top_bits(got, 0).tolist() == [0] * len(ints)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, 2, 3]), max_size=300),
       st.integers(1, 50))
def test_int_table_gives_first_sight_codes(values, batch):
    t = IntTable(capacity=2)  # tiny: growing is exercised
    seen: dict[int, int] = {}
    for i in range(0, len(values), batch):
        part = np.array(values[i : i + batch], np.int64)
        valid = np.array([v % 5 != 4 for v in values[i : i + batch]], bool)  # some "nulls"
        codes = t.codes(part, valid)
        for v, ok, c in zip(part.tolist(), valid, codes.tolist()):
            if not ok:
                assert c == 0
                continue
            seen.setdefault(v, len(seen) + 1)
            assert c == seen[v]
    assert t.values().tolist() == list(seen)
    probe = np.array([*seen, 2**62 + 12345], np.int64)
    expected = [seen[v] for v in seen] + [-1 if 2**62 + 12345 not in seen else seen[2**62 + 12345]]
    assert t.codes(probe, np.ones(len(probe), bool), insert=False).tolist() == expected


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(max_size=6) | st.sampled_from(["a", "b", ""]), max_size=200), st.integers(1, 40))
def test_str_table_gives_first_sight_codes(values, batch):
    t = StrTable(capacity=2)
    seen: dict[str, int] = {}
    for i in range(0, len(values), batch):
        part = values[i : i + batch]
        codes = t.codes(pa.array(part, pa.string()), np.ones(len(part), bool))
        for v, c in zip(part, codes.tolist()):
            seen.setdefault(v, len(seen) + 1)
            assert c == seen[v]
    assert t.arrow_values().to_pylist() == list(seen)
    assert t.hashes().tolist() == [reference.user_hash(v) for v in seen]


@settings(deadline=None)
@given(st.lists(st.binary(max_size=8) | st.text(max_size=4).map(str.encode), max_size=100))
def test_utf8_check_agrees_with_python(items):
    offsets = np.cumsum([0] + [len(b) for b in items]).astype(np.int32)
    data = np.frombuffer(b"".join(items) or b"\0", np.uint8)
    expected = []
    for b in items:
        try:
            b.decode("utf-8")
            expected.append(False)
        except UnicodeDecodeError:
            expected.append(True)
    assert utf8_invalid(offsets, data).tolist() == expected


def _iso_expected(s: str | None) -> int | str | None:
    if s is None:
        return None
    try:
        t = dt.datetime.fromisoformat(s.strip())
    except ValueError:
        return "bad"
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


_ISO = st.builds(
    lambda d, sep, h, m, s, us, z: f"{d.isoformat()}{sep}{h:02d}:{m:02d}:{s:02d}{us}{z}",
    st.dates(dt.date(1900, 1, 1), dt.date(2200, 12, 31)),
    st.sampled_from(["T", " "]),
    st.integers(0, 23), st.integers(0, 59), st.integers(0, 59),
    st.sampled_from(["", ".5", ".123", ".123456", ".1234567"]),
    st.sampled_from(["", "Z", "+09:00", "-05:30", "+0100"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ISO | st.dates().map(str) | st.text(max_size=12) | st.none(), max_size=30))
def test_iso_parser_agrees_with_fromisoformat(strings):
    t, null, bad = to_micros(pa.array(strings, pa.string()), "s")
    for s, v, n, b in zip(strings, t.tolist(), null, bad):
        exp = _iso_expected(s)
        got = None if n else ("bad" if b else v)
        assert got == exp, s
        if n or b:
            assert v == T_BAD


@pytest.mark.parametrize("unit,per_s", [("s", 1), ("ms", 10**3), ("us", 10**6), ("ns", 10**9)])
def test_micros_from_timestamps_and_epochs(unit, per_s):
    raw = [0, -1, 1767225600 * per_s + per_s - 1, None]
    for arr in (pa.array(raw, pa.timestamp(unit, tz="Asia/Tokyo")), pa.array(raw, pa.int64())):
        t, null, bad = to_micros(arr, unit)
        exp = [(x * 10**6) // per_s for x in raw[:3]]
        assert t[:3].tolist() == exp and null.tolist() == [False, False, False, True] and not bad.any()
    t, null, bad = to_micros(pa.array([1.0, 1.5, float("nan"), None]), "ms")
    assert t[0] == 1000 and bad.tolist() == [False, True, True, False] and null.tolist() == [False] * 3 + [True]
    _, _, bad = to_micros(pa.array([2**62], pa.int64()), "s")  # beyond int64 microseconds
    assert bad.tolist() == [True]


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"])
def test_local_time_table_matches_zoneinfo(tz):
    rng = np.random.default_rng(7)
    t = np.concatenate([rng.integers(-(2**31), 2**32, 3000), 1774746000 + np.arange(-7200, 7200, 599)])
    zone = zoneinfo.ZoneInfo(tz)
    exp = [x + int(dt.datetime.fromtimestamp(int(x), zone).utcoffset().total_seconds()) for x in t]
    assert local_seconds(t, tz).tolist() == exp
    # The table of 2026: each start is an exact change of offset, and no change is missed.
    lo, hi = 1767225600, 1798761600

    def off(x: int) -> int:
        return int(dt.datetime.fromtimestamp(x, zone).utcoffset().total_seconds())

    starts, offsets = offset_table(tz, lo, hi)
    for s_, o in zip(starts[1:].tolist(), offsets[1:].tolist()):
        assert off(s_) == o and off(s_ - 1) != o
    hourly = [off(x) for x in range(lo, hi, 3600)]
    assert len(starts) - 1 == sum(a != b for a, b in zip(hourly, hourly[1:]))


def _sorted(uidx, t_us, codes, n_users):
    """sort_rows with identity code tables and one task."""
    n, k = codes.shape
    size = int(codes.max()) + 1 if n else 1
    luts = np.tile(np.arange(size, dtype=np.int32), k)
    bases = (np.arange(k) * size).reshape(1, k).astype(np.int64)
    when = (t_us // 10**6 << 32) | (t_us % 10**6)
    return sort_rows(uidx, when, codes, np.array([0, n], np.int64), luts, bases, n_users)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 3), st.integers(0, 2)),
                max_size=120))
def test_duplicates_keep_the_first_of_equal_events(events):
    """(user, second, sub-second, value) events; a repeat of all four is a duplicate."""
    n = len(events)
    uidx = np.array([e[0] for e in events], np.int64)
    t_sec = np.array([e[1] for e in events], np.int64)
    t_us = t_sec * 10**6 + np.array([e[2] for e in events], np.int64)
    # The event's index rides along as a second code, to see where each row came from.
    codes = np.array([[e[3], i] for i, e in enumerate(events)], np.int32).reshape(n, 2)
    rows, offsets = _sorted(uidx, t_us, codes, 5)
    perm = rows[:, COL_CODES + 1].tolist()
    assert perm == sorted(range(n), key=lambda i: (events[i][0], events[i][1], i))
    assert rows[:, COL_T].tolist() == t_sec[perm].tolist() and rows[:, COL_US].tolist() == [events[i][2] for i in perm]
    assert rows[:, COL_USER].tolist() == uidx[perm].tolist()
    dedupe = rows.copy()
    dedupe[:, COL_CODES + 1] = 0  # compare on the value only
    dup = sorted_duplicates(offsets, dedupe)
    seen, expected = set(), []
    for i in perm:
        expected.append(events[i] in seen)
        seen.add(events[i])
    assert dup.tolist() == expected
    kept, koff = drop_rows(offsets, rows.copy(), dup)
    assert kept[:, COL_CODES + 1].tolist() == [i for i, d in zip(perm, dup) if not d]
    assert np.diff(koff).tolist() == [sum(1 for i, d in zip(perm, dup) if not d and events[i][0] == u)
                                      for u in range(5)]


def test_duplicates_in_a_long_run_of_one_second():
    """More than 48 events in one second of one user take the hashed path; same answer."""
    rng = np.random.default_rng(3)
    n = 500
    vals = rng.integers(0, 30, n)
    sub = rng.integers(0, 3, n)
    rows, offsets = _sorted(np.zeros(n, np.int64), 100 * 10**6 + sub, vals.astype(np.int32).reshape(n, 1), 1)
    dup = sorted_duplicates(offsets, rows)
    seen, expected = set(), []
    for i in range(n):
        expected.append((vals[i], sub[i]) in seen)
        seen.add((vals[i], sub[i]))
    assert dup.tolist() == expected


def test_sort_moves_rows_and_applies_task_tables():
    """Rows of two tasks, each with its own code table, come out sorted and in global codes."""
    rng = np.random.default_rng(5)
    for run, n_users in ((5, 30), (40, 30), (200, 30), (3, 5000)):  # short and long runs; many buckets
        n = n_users * run
        uidx = rng.integers(0, n_users, n)
        t = rng.integers(0, 20, n)  # many equal seconds: stability matters
        codes = rng.integers(0, 4, (n, 2)).astype(np.int32)
        # task 0 maps code c -> c + 10 (attr 0) / c + 20 (attr 1); task 1 -> c + 30 / c + 40
        luts = np.concatenate([np.arange(4) + off for off in (10, 20, 30, 40)]).astype(np.int32)
        bases = np.array([[0, 4], [8, 12]], np.int64)
        bounds = np.array([0, n // 3, n], np.int64)
        rows, offsets = sort_rows(uidx, (t << 32) | 7, codes, bounds, luts, bases, n_users)
        perm = np.array(sorted(range(n), key=lambda i: (uidx[i], t[i], i)))
        assert rows[:, COL_T].tolist() == t[perm].tolist() and set(rows[:, COL_US].tolist()) == {7}
        task = (perm >= n // 3).astype(int)
        assert rows[:, COL_CODES].tolist() == (codes[perm, 0] + 10 + 20 * task).tolist()
        assert rows[:, COL_CODES + 1].tolist() == (codes[perm, 1] + 20 + 20 * task).tolist()
        assert offsets.tolist() == np.concatenate([[0], np.cumsum(np.bincount(uidx, minlength=n_users))]).tolist()
        assert sort_by_user_time(uidx, t, n_users)[0].tolist() == perm.tolist()


def test_user_count_sketch_is_within_three_percent():
    for n in (0, 1, 50, 5000, 300_000):
        reg = np.zeros(1 << 14, np.uint8)
        ids = np.arange(n, dtype=np.int64) * 7919 + 11
        h = hash_ids(pa.array(ids))
        hll_update(reg, h, np.ones(n, bool))
        hll_update(reg, h[: n // 2], np.ones(n // 2, bool))  # repeats do not count
        assert abs(hll_estimate(reg) - n) <= max(1.0, 0.03 * n)


def test_string_buffers_of_sliced_and_large_arrays():
    arr = pa.array(["ab", None, "cde", "f"])
    for a in (arr.slice(1), arr.cast(pa.large_string()).slice(2)):
        offsets, data = string_buffers(a)
        got = [bytes(data[offsets[i] : offsets[i + 1]]).decode() for i in range(len(a))]
        assert [g for g, v in zip(got, a.to_pylist()) if v is not None] == [v for v in a.to_pylist() if v is not None]
