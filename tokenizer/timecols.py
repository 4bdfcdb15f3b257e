"""Time columns: any input form -> int64 UTC microseconds, and UTC -> local wall-clock seconds.

Accepted time columns (FORMATS.md §1):

- Arrow timestamps of any unit, with or without a time zone (naive means UTC): their int64
  storage already counts from the UTC epoch, so only the unit is converted.
- Integer (or integral float) epochs in the segment's ``time_unit``.
- Strings in ISO 8601 (``2026-01-01``, ``2026-01-01 10:00:00``, ``2026-01-01T10:00:00.25Z``,
  ``...+09:00``), parsed by a compiled parser; a string that does not parse is a bad row
  (``bad_time``), not an error of the whole file.  Naive strings mean UTC, as naive timestamps do.

Microseconds keep sub-second differences (duplicate detection needs them) while spanning
±292,000 years; the word rules use whole seconds, floored.

Local time uses a table of the zone's UTC-offset changes over the needed range (built once
with :mod:`zoneinfo`, the same rules as the reference), so converting a batch is a compiled
binary search per event instead of a call into a time-zone library.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

import numpy as np
import pyarrow as pa
from numba import njit

from tokenizer.hashing import string_buffers

US_PER_S = 1_000_000
_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Epoch values beyond this many seconds cannot be held in int64 microseconds: they are
# reported as outside the window instead of overflowing.
_MAX_ABS_S = (2**63 - 1) // US_PER_S - 1
T_BAD = np.iinfo(np.int64).min  # marker in t_us for a null or unparseable time


def check_time_type(t: pa.DataType) -> bool:
    base = t.value_type if pa.types.is_dictionary(t) else t
    return (
        pa.types.is_timestamp(base)
        or pa.types.is_integer(base)
        or pa.types.is_floating(base)
        or pa.types.is_string(base)
        or pa.types.is_large_string(base)
        or pa.types.is_string_view(base)
        or pa.types.is_null(base)
    )


@njit(cache=True, nogil=True)
def _scale(values, valid, per_s, out, bad):  # pragma: no cover - compiled
    """int epochs in units of 1/per_s s -> microseconds (floored); out-of-range -> bad."""
    lim = np.int64(_MAX_ABS_S)
    for i in range(values.shape[0]):
        if not valid[i]:
            out[i] = T_BAD
            continue
        v = values[i]
        if per_s >= US_PER_S:
            q = v // (per_s // US_PER_S)
            out[i] = q
        else:
            s = v // per_s
            if s > lim or s < -lim:
                out[i] = T_BAD
                bad[i] = True
                continue
            out[i] = v * (US_PER_S // per_s)


def to_micros(arr: pa.Array, time_unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t_us int64, null bool, unparseable bool) of a time column batch.

    ``t_us`` holds :data:`T_BAD` where the time is null or unparseable.  Out-of-range epochs
    (beyond ±292,000 years) are flagged unparseable.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    n = len(arr)
    valid = _valid(arr)
    null = ~valid
    bad = np.zeros(n, bool)
    out = np.empty(n, np.int64)
    if pa.types.is_null(t):
        out[:] = T_BAD
        return out, np.ones(n, bool), bad
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        offsets, data = string_buffers(arr)
        _parse_iso(offsets, data, valid, out, bad)
        return out, null, bad
    if pa.types.is_floating(t):
        f = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = valid & np.isfinite(f)
        ok &= np.floor(np.where(ok, f, 0.0)) == np.where(ok, f, 0.0)
        bad |= valid & ~ok
        ints = np.where(ok, f, 0.0)
        ok &= np.abs(ints) < 2.0**62
        bad |= valid & ~ok
        _scale(ints.astype(np.int64), ok, _PER_S[time_unit], out, bad)
        return out, null, bad
    per_s = _PER_S[t.unit] if pa.types.is_timestamp(t) else _PER_S[time_unit]
    storage = arr.cast(pa.int64()) if not pa.types.is_timestamp(t) else arr.view(pa.int64())
    buf = storage.buffers()[1]
    values = (
        np.frombuffer(buf, np.int64, count=n, offset=storage.offset * 8) if buf is not None else np.zeros(n, np.int64)
    )
    _scale(values, valid, per_s, out, bad)
    return out, null, bad


def _valid(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


# -- ISO 8601 ---------------------------------------------------------------------------------------
@njit(inline="always")
def _days_from_civil(y, m, d):  # pragma: no cover - compiled
    # Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


@njit(inline="always")
def _digits(data, j, k):  # pragma: no cover - compiled
    """Value of the k decimal digits at data[j:j+k], or -1 if any is not a digit."""
    v = 0
    for q in range(j, j + k):
        c = data[q]
        if c < 48 or c > 57:
            return -1
        v = v * 10 + (c - 48)
    return v


@njit(cache=True, nogil=True)
def _parse_iso(offsets, data, valid, out, bad):  # pragma: no cover - compiled
    mdays = np.array([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    for i in range(offsets.shape[0] - 1):
        out[i] = T_BAD
        if not valid[i]:
            continue
        j, e = offsets[i], offsets[i + 1]
        while j < e and data[j] == 32:  # surrounding spaces are tolerated (CSV writers)
            j += 1
        while e > j and data[e - 1] == 32:
            e -= 1
        ok = False
        y = mo = d = 0
        if e - j >= 10 and data[j + 4] == 45 and data[j + 7] == 45:
            y, mo, d = _digits(data, j, 4), _digits(data, j + 5, 2), _digits(data, j + 8, 2)
            if y >= 0 and 1 <= mo <= 12 and 1 <= d <= mdays[mo - 1]:
                leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
                if not (mo == 2 and d == 29 and not leap):
                    ok = True
        if not ok:
            bad[i] = True
            continue
        secs = np.int64(_days_from_civil(y, mo, d)) * 86400
        frac = np.int64(0)
        p = j + 10
        if p < e:
            ok = False
            if (data[p] == 84 or data[p] == 32) and e - p >= 6 and data[p + 3] == 58:
                hh, mi = _digits(data, p + 1, 2), _digits(data, p + 4, 2)
                p += 6
                ss = 0
                if hh >= 0 and mi >= 0 and hh < 24 and mi < 60:
                    ok = True
                    if p < e and data[p] == 58:
                        ss = _digits(data, p + 1, 2) if e - p >= 3 else -1
                        p += 3
                        if ss < 0 or ss > 60:
                            ok = False
                        elif p < e and (data[p] == 46 or data[p] == 44):  # fraction
                            p += 1
                            scale = np.int64(100000)
                            nd = 0
                            while p < e and 48 <= data[p] <= 57:
                                if nd < 6:
                                    frac += (data[p] - 48) * scale
                                    scale //= 10
                                nd += 1
                                p += 1
                            if nd == 0:
                                ok = False
                secs += hh * 3600 + mi * 60 + ss
                if ok and p < e:  # zone designator
                    if data[p] == 90 and p + 1 == e:  # Z
                        p += 1
                    elif data[p] == 43 or data[p] == 45:
                        sign = 1 if data[p] == 43 else -1
                        oh = _digits(data, p + 1, 2) if e - p >= 3 else -1
                        p += 3
                        om = 0
                        if p < e and data[p] == 58:
                            p += 1
                        if p < e:
                            om = _digits(data, p, 2) if e - p >= 2 else -1
                            p += 2
                        if oh < 0 or om < 0 or oh > 18 or om > 59:
                            ok = False
                        else:
                            secs -= sign * (oh * 3600 + om * 60)
                    else:
                        ok = False
                    if p != e:
                        ok = False
            if not ok:
                bad[i] = True
                continue
        out[i] = secs * US_PER_S + frac


# -- local time ---------------------------------------------------------------------------------------
_MIN_DT_S = int(dt.datetime(1, 1, 2, tzinfo=dt.UTC).timestamp())
_MAX_DT_S = int(dt.datetime(9999, 12, 30, tzinfo=dt.UTC).timestamp())


def offset_table(timezone: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, offsets) int64: from UTC second ``starts[i]`` on, local = utc + ``offsets[i]``.

    Covers [lo, hi] (beyond it the first/last offset holds).  Offsets are sampled every hour
    (coarser for ranges over 50 years) and each change is bisected to the second; zones never
    change offset twice within an hour.
    """
    zone = zoneinfo.ZoneInfo(timezone)
    lo, hi = max(int(lo), _MIN_DT_S), min(max(int(hi), int(lo)), _MAX_DT_S)
    lo = min(lo, hi)

    def off(t: int) -> int:
        return int(dt.datetime.fromtimestamp(t, zone).utcoffset().total_seconds())

    step = max(3600, (hi - lo) // 450_000 + 1)
    starts, offsets = [lo], [off(lo)]
    t = lo
    while t < hi:
        nxt = min(t + step, hi)
        o = off(nxt)
        if o != offsets[-1]:
            a, b = t, nxt  # off(a) == offsets[-1], off(b) == o
            while b - a > 1:
                mid = (a + b) // 2
                if off(mid) == offsets[-1]:
                    a = mid
                else:
                    b = mid
            starts.append(b)
            offsets.append(o)
        t = nxt
    starts[0] = np.iinfo(np.int64).min
    return np.array(starts, np.int64), np.array(offsets, np.int64)


@njit(cache=True, nogil=True)
def local_from_table(t_utc: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:  # pragma: no cover
    """int64 local seconds of int64 UTC seconds, by binary search in an :func:`offset_table`."""
    out = np.empty(t_utc.shape[0], np.int64)
    m = starts.shape[0]
    if m == 1:
        o = offsets[0]
        for i in range(t_utc.shape[0]):
            out[i] = t_utc[i] + o
        return out
    for i in range(t_utc.shape[0]):
        t = t_utc[i]
        a, b = 0, m  # find the last start <= t
        while b - a > 1:
            mid = (a + b) // 2
            if starts[mid] <= t:
                a = mid
            else:
                b = mid
        out[i] = t + offsets[a]
    return out


_TABLES: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}


class LocalClock:
    """UTC seconds -> local seconds in one zone over a known range (a reusable offset table)."""

    def __init__(self, timezone: str, lo: int, hi: int) -> None:
        self.timezone = timezone
        self.lo, self.hi = lo, hi
        key = (timezone, int(lo), int(hi))
        if key not in _TABLES:  # tables are small and pure functions of the key: build each once
            _TABLES[key] = offset_table(timezone, lo, hi)
        self.starts, self.offsets = _TABLES[key]

    def __call__(self, t_utc: np.ndarray) -> np.ndarray:
        return local_from_table(np.ascontiguousarray(t_utc, dtype=np.int64), self.starts, self.offsets)


def local_seconds(utc_seconds: np.ndarray, timezone: str) -> np.ndarray:
    """Wall-clock seconds in ``timezone`` (``utc + tz_offset(utc)``) as int64, DST included."""
    t = np.ascontiguousarray(utc_seconds, dtype=np.int64)
    if timezone in ("UTC", "Etc/UTC", "Z") or len(t) == 0:
        return t.copy()
    return LocalClock(timezone, int(t.min()) - 86400, int(t.max()) + 86400)(t)
