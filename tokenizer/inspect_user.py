"""``userbert-engine inspect``: one user's words in readable form, attribute values decoded.

Positions are shown as the date (day positions) or the hour (hour positions) they stand for,
bucketed attributes as their value range, and unknown values as ``?``.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import numpy as np
import pyarrow as pa

from tokenizer.schema import FIRST_ID, PAD_ID, UNK_ID, parse_time, schema_from_dict
from tokenizer.shards import TokenizedData


def _value_text(value: Any, buckets: list[float] | None) -> str:
    if buckets is None:
        return str(value)
    b = int(value)
    lo = "-inf" if b == 0 else f"{buckets[b - 1]:g}"
    hi = "inf" if b >= len(buckets) else f"{buckets[b]:g}"
    return f"[{lo},{hi})"


class Decoder:
    """Turns ids back into values for one tokenized directory."""

    def __init__(self, data: TokenizedData) -> None:
        self.data = data
        self.schema = schema_from_dict(data.manifest["schema"])
        self._values: dict[tuple[str, str], list[Any]] = {}

    def value(self, segment: str, attribute: str, idx: int, buckets: list[float] | None = None) -> str:
        if idx == PAD_ID:
            return "<pad>"
        if idx == UNK_ID:
            return "?"
        key = (segment, attribute)
        if key not in self._values:
            self._values[key] = self.data.vocab(segment, attribute).to_pylist()
        values = self._values[key]
        j = idx - FIRST_ID
        return _value_text(values[j], buckets) if 0 <= j < len(values) else f"<bad id {idx}>"

    def position(self, segment: str, pos: int) -> str:
        spec = self.schema.segments[segment]
        tz = zoneinfo.ZoneInfo(self.schema.data.timezone)
        start = dt.datetime.fromtimestamp(parse_time(spec.window_start, self.schema.data.timezone, "window_start"), tz)
        if spec.position_unit == "hour":
            t = start + dt.timedelta(hours=pos)
            return t.strftime("%Y-%m-%d %H:00")
        # Day 0 is the 04:00-to-04:00 day that holds the window start.
        day0 = (start - dt.timedelta(hours=spec.day_start_hour)).date()
        return (day0 + dt.timedelta(days=pos)).isoformat()


def user_row(data: TokenizedData, user: str | None, row: int | None) -> int:
    """The row of a user given by id (ints are tried as ints first) or by row number."""
    if row is not None:
        if not 0 <= row < data.num_users:
            raise ValueError(f"row {row} out of range: the data has {data.num_users} users")
        return row
    if user is None:
        if data.num_users == 0:
            raise ValueError("the data has no users")
        return 0
    query: Any = user
    if pa.types.is_integer(data.user_ids.type) and user.lstrip("-").isdigit():
        query = int(user)
    try:
        found = int(data.user_index([query])[0])
    except TypeError:
        found = -1
    if found < 0:
        raise ValueError(f"user {user!r} not found in {data.root}")
    return found


def format_user(data: TokenizedData, row: int, segments: list[str] | None = None, max_words: int | None = None) -> str:
    """A readable listing of one user: attributes, then each segment's words and actions."""
    dec = Decoder(data)
    man = data.manifest
    lines = [f"user {data.user_ids[row].as_py()!r} (row {row} of {data.num_users})"]
    names = man["user_attributes"]["names"]
    if names:
        specs = {u.name: u for u in dec.schema.user_attributes}
        vals = [f"{n}={dec.value('user', n, int(data.user_attr_ids[row, j]), specs[n].buckets)}"
                for j, n in enumerate(names)]
        lines.append("  attributes: " + " ".join(vals))
    for seg in data.segments:
        if segments and seg.name not in segments:
            continue
        spec = dec.schema.segments[seg.name]
        buckets = {a.name: a.buckets for a in spec.attributes}
        w0, w1 = int(seg.user_word_offsets[row]), int(seg.user_word_offsets[row + 1])
        a0 = int(seg.user_action_offsets[row])
        lines.append(f"  {seg.name}: {w1 - w0} words, "
                     f"{int(seg.user_action_offsets[row + 1]) - a0} actions ({spec.word_rule} words)")
        starts = a0 + np.concatenate([[0], np.cumsum(seg.word_len[w0:w1])]).astype(np.int64)
        shown = range(w0, w1) if max_words is None else range(max(w0, w1 - max_words), w1)
        if max_words is not None and w1 - w0 > max_words:
            lines.append(f"    ... {w1 - w0 - max_words} earlier words not shown")
        for w in shown:
            pos = int(seg.word_pos[w])
            lines.append(f"    word {w - w0:>3}  pos {pos:>5} ({dec.position(seg.name, pos)})  "
                         f"{int(seg.word_len[w])} actions")
            for a in range(int(starts[w - w0]), int(starts[w - w0 + 1])):
                vals = [f"{n}={dec.value(seg.name, n, int(seg.attr_ids[a, k]), buckets[n])}"
                        for k, n in enumerate(seg.attributes)]
                lines.append("      " + " ".join(vals))
    return "\n".join(lines)
