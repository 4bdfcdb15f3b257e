"""A segment's time window: the range the reading pass accepts, and edges resolved from the data.

The schema may leave either edge of a window out (docs/TOKENIZER.md, "The window").  Events are
spilled as int32 seconds from a fixed *anchor* so that the words pass needs no division; the
anchor must be known before reading, so it is:

- the window start, when the schema gives one;
- else the window end minus 2**31 - 1 seconds, when the schema gives the end;
- else 1990-01-01T00:00:00Z (:data:`OPEN_ANCHOR`): logs from 1990 to 2058 can be read with no
  window at all.

The reading pass records the first and last time of the rows it would keep (every job of a
``--num-shards`` run sees every row, so all jobs resolve the same window).  An open start is then
the start of the local day (``position_unit = "day"``: of the 04:00 day, ``day_start_hour``) or of
the hour of the first event; an open end is the end of the local day or hour of the last event.
The words pass shifts the spilled seconds from the anchor to the resolved start.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

from tokenizer.io import InputError

SPAN = 2**31 - 1  # event times are kept as int32 seconds from the anchor
OPEN_ANCHOR = 631_152_000  # 1990-01-01T00:00:00Z
_UNIT_FACTORS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class ReadWindow:
    """What the reading pass accepts: [lo, hi) UTC seconds; the anchor is ``lo``."""

    lo: int
    hi: int
    open_start: bool
    open_end: bool

    @property
    def is_open(self) -> bool:
        return self.open_start or self.open_end


def read_window(start: int | None, end: int | None) -> ReadWindow:
    if start is not None:
        lo = start
    elif end is not None:
        lo = end - SPAN
    else:
        lo = OPEN_ANCHOR
    hi = end if end is not None else lo + SPAN
    return ReadWindow(lo, hi, start is None, end is None)


def iso_utc(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local(t: int, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz)


def _floor(t: int, unit: str, day_start_hour: int, tz: zoneinfo.ZoneInfo) -> int:
    """UTC seconds of the start of the local day (from ``day_start_hour``) or UTC hour holding t."""
    if unit == "hour":
        return t - t % 3600
    local = _local(t, tz).replace(tzinfo=None)
    day = local.replace(hour=day_start_hour, minute=0, second=0, microsecond=0)
    if day > local:
        day -= dt.timedelta(days=1)
    return int(day.replace(tzinfo=tz).timestamp())


def _next(t0: int, unit: str, tz: zoneinfo.ZoneInfo) -> int:
    """The start of the day or hour after the one that starts at t0 (local days: DST-aware)."""
    if unit == "hour":
        return t0 + 3600
    local = _local(t0, tz).replace(tzinfo=None) + dt.timedelta(days=1)
    return int(local.replace(tzinfo=tz).timestamp())


def resolve(segment: str, rw: ReadWindow, given: tuple[int | None, int | None], first: int | None,
            last: int | None, unit: str, day_start_hour: int, timezone: str) -> tuple[int, int]:
    """The segment's window [start, end) in UTC seconds, open edges taken from the first and last
    time of the rows kept (``first``/``last``: None when no row was).  Raises when the data's span
    cannot be held, naming the times and the fix."""
    tz = zoneinfo.ZoneInfo(timezone)
    start, end = given
    if first is None:  # nothing to resolve from: an empty window where the edges are open
        start = start if start is not None else (end - 1 if end is not None else rw.lo)
        return start, end if end is not None else start + 1
    if start is None:
        start = _floor(first, unit, day_start_hour, tz)
    if end is None:
        end = _next(_floor(last, unit, day_start_hour, tz), unit, tz)
    if start < rw.lo or end > rw.hi + 1 or end - start > SPAN:
        where = ("events before the window end" if rw.open_start and not rw.open_end else
                 "events after the window start" if rw.open_end and not rw.open_start else "events")
        raise InputError(
            f"segment {segment!r}: {where} run from {iso_utc(first)} to {iso_utc(last)}, more than the 68 years "
            f"one window can hold; set window_start and window_end "
            "in the schema (or check time_unit: a wrong unit spreads times over centuries)")
    return start, end


def unit_hint(first: int, last: int, window: tuple[int, int], time_unit: str) -> str | None:
    """If the times fall in the window once read in another unit, the unit that fits; else None."""
    lo, hi = window
    f = _UNIT_FACTORS[time_unit]
    for name, g in _UNIT_FACTORS.items():
        if name == time_unit:
            continue
        a, b = first * f // g, last * f // g
        if a < hi and b >= lo:
            return name
    return None
