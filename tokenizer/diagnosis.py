"""Loud failures and warnings about what a run dropped (docs/TOKENIZER.md, "Bad input").

Bad rows are counted by reason, but counts alone let a broken run look finished: a time column
in seconds read as milliseconds puts every event outside the window and the run writes a
manifest with 0 users.  After the reading pass:

- a run that reads events but keeps none fails, naming each segment's likely cause;
- a segment that keeps nothing, or loses most of its rows (:data:`MOST`) to one reason, is a
  warning with the likely cause.

After the words pass, a segment whose ``max_actions_per_word`` cap drops more than
:data:`CAPPED` of its events is a warning naming the knob.  Warnings go to the manifest
(``warnings``) and the command's summary.
"""

from __future__ import annotations

from typing import Any

from tokenizer.io import InputError
from tokenizer.plan import Plan, SegmentPlan
from tokenizer.reader import REASON_TEXT, REASONS
from tokenizer.window import iso_utc, unit_hint

MOST = 0.5  # share of a segment's rows dropped for one reason that warrants a warning
CAPPED = 0.05  # share of a segment's events dropped by the per-word cap that warrants a warning
_ZONE_SLACK = 14 * 3600  # the widest UTC offset: times this close to the window may be a zone mix-up


def _span(results: list[dict[str, Any]], index: int, key: str) -> tuple[int, int] | None:
    spans = [r["streams"][index]["span"].get(key) for r in results]
    spans = [s for s in spans if s]
    return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None


def resolve_windows(plan: Plan, results: list[dict[str, Any]]) -> None:
    """Give every segment with an open window edge its window from the data (tokenizer/window.py)."""
    for seg in plan.segments:
        if seg.read.is_open:
            span = _span(results, seg.index, "in")
            seg.resolve_window(*(span if span else (None, None)))


def _cause(seg: SegmentPlan, reason: str, results: list[dict[str, Any]]) -> str:
    spec = seg.spec
    if reason == "outside_window":
        start, end = seg.window
        text = f"the window is [{iso_utc(start)}, {iso_utc(end)})"
        span = _span(results, seg.index, "timed")
        if span is None:
            return text
        first, last = span
        text += f" and the times run from {iso_utc(first)} to {iso_utc(last)}"
        unit = unit_hint(first, last, (start, end), spec.time_unit)
        if unit is not None:
            return (text + f": read as epoch {unit} they fall in the window (time_unit = \"{unit}\"; the schema "
                    f"says \"{spec.time_unit}\")")
        if first < end + _ZONE_SLACK and last >= start - _ZONE_SLACK:
            return text + f": close to the window edges; check the time zone ({seg.timezone}) and the window"
        return text + ": check window_start/window_end (or leave them out to take them from the data)"
    if reason in ("null_time", "bad_time"):
        return f"check time_column = {spec.time_column!r} (and its format)"
    if reason == "null_user":
        return f"check user_column = {seg.user_column!r}"
    return "see the dropped counts"


def check_kept(plan: Plan, results: list[dict[str, Any]]) -> list[str]:
    """After the reading pass: raise if events were read and none kept; warnings otherwise."""
    warnings, fatal = [], []
    any_kept = False
    total = 0
    for seg in plan.segments:
        rows = sum(r["streams"][seg.index]["rows"] for r in results)
        dropped = {k: sum(r["streams"][seg.index]["dropped"].get(k, 0) for r in results) for k in REASONS}
        total += rows
        kept = rows - sum(dropped.values())
        any_kept |= kept > 0
        if rows == 0:
            continue
        reason, n = max(dropped.items(), key=lambda kv: kv[1])
        if kept == 0:
            line = (f"segment {seg.name!r}: none of its {rows:,} rows was kept ({n:,} dropped as "
                    f"{REASON_TEXT[reason]}): {_cause(seg, reason, results)}")
            fatal.append(line)
            warnings.append(line)
        elif n > MOST * rows:
            warnings.append(f"segment {seg.name!r}: {n:,} of {rows:,} rows ({n / rows:.0%}) dropped as "
                            f"{REASON_TEXT[reason]}: {_cause(seg, reason, results)}")
    if total and not any_kept:
        raise InputError("no event was kept:\n  " + "\n  ".join(fatal))
    return warnings


def capping_warnings(plan: Plan, counts: dict[str, Any]) -> list[str]:
    """After the words pass: segments whose per-word cap drops more than :data:`CAPPED` of the events."""
    out = []
    for seg in plan.segments:
        c = counts[seg.name]
        if c["events"] and c["actions_capped"] > CAPPED * c["events"]:
            out.append(f"segment {seg.name!r}: max_actions_per_word = {seg.spec.max_actions_per_word} dropped "
                       f"{c['actions_capped']:,} of {c['events']:,} events ({c['actions_capped'] / c['events']:.0%}); "
                       "set word_overflow = \"split\" to cut long words into several instead (bursty logs), or raise "
                       "max_actions_per_word")
    return out
