"""A slow, obviously-correct restatement of the tokenizer rules, for tests only.

Plain Python over lists, with :mod:`datetime` and :mod:`zoneinfo` for local time, and no code
shared with the fast path (no numpy, no pyarrow, no Numba).  docs/FORMATS.md §2 and §3 are the
specification; each function below follows one paragraph of it.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter
from typing import Any

_UTC = dt.UTC


_MASK64 = (1 << 64) - 1


def fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finaliser on Python ints."""
    x &= _MASK64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    x ^= x >> 33
    return x


def user_hash(user_id: int | str) -> int:
    """The user hash of FORMATS.md §4: fmix64 of the int64 id, or of FNV-1a 64 over the UTF-8 bytes."""
    if isinstance(user_id, str):
        h = 0xCBF29CE484222325
        for b in user_id.encode("utf-8"):
            h = ((h ^ b) * 0x100000001B3) & _MASK64
        return fmix64(h)
    return fmix64(user_id & _MASK64)


def user_order(ids: Any, shard_bits: int = 0) -> list[Any]:
    """Distinct ids in output order: by shard (the top shard_bits bits of the hash), then id."""
    return sorted(set(ids), key=lambda u: (shard_of(u, shard_bits), u))


def shard_of(user_id: int | str, shard_bits: int) -> int:
    return user_hash(user_id) >> (64 - shard_bits) if shard_bits else 0


def local_datetime(t: int, timezone: str) -> dt.datetime:
    """The wall-clock time in ``timezone`` at UTC epoch second ``t``."""
    return dt.datetime.fromtimestamp(t, tz=_UTC).astimezone(zoneinfo.ZoneInfo(timezone))


def day_key(t: int, timezone: str, day_start_hour: int) -> int:
    """Which day (as a proleptic ordinal) the local time falls in, days starting at day_start_hour."""
    local = local_datetime(t, timezone).replace(tzinfo=None)
    return (local - dt.timedelta(hours=day_start_hour)).date().toordinal()


def hour_of_day(t: int, timezone: str) -> int:
    return local_datetime(t, timezone).hour


def weekday(t: int, timezone: str) -> int:
    return local_datetime(t, timezone).weekday()


def bucket(x: float | None, buckets: list[float]) -> int | None:
    """Index of the first boundary greater than x (x < b[0] -> 0, x >= b[-1] -> len(b))."""
    if x is None or x != x:  # None or NaN
        return None
    return sum(1 for b in buckets if x >= b)


def user_words(
    times: list[int],
    *,
    rule: str,
    position_unit: str,
    timezone: str,
    window_start_utc: int,
    day_start_hour: int = 4,
    gap_minutes: float = 30.0,
    max_words: int = 128,
    max_actions_per_word: int = 32,
    word_overflow: str = "cap",
) -> list[tuple[int, list[int]]]:
    """One user's words: [(position, [indices into ``times`` of the kept actions])].

    ``times`` are the user's events in input order; they are ordered here by (time, input order).
    ``rule`` "action" makes every action a word; ``word_overflow = "split"`` cuts a word of more
    than ``max_actions_per_word`` actions into words of that many (the last one shorter).
    """
    order = sorted(range(len(times)), key=lambda i: (times[i], i))
    words: list[list[int]] = []
    for j, i in enumerate(order):
        if j == 0 or rule == "action":
            new = True
        elif rule == "daily":
            prev = order[j - 1]
            new = day_key(times[i], timezone, day_start_hour) != day_key(
                times[prev], timezone, day_start_hour
            )
        else:
            new = times[i] - times[order[j - 1]] > gap_minutes * 60
        if new:
            words.append([i])
        else:
            words[-1].append(i)
    if word_overflow == "split":
        m = max_actions_per_word
        words = [w[k: k + m] for w in words for k in range(0, len(w), m)]

    start_day = day_key(window_start_utc, timezone, day_start_hour)
    out = []
    for word in words[-max_words:]:  # truncation: keep the last max_words words
        first = times[word[0]]
        if position_unit == "hour":
            pos = (first - window_start_utc) // 3600
        else:
            pos = day_key(first, timezone, day_start_hour) - start_day
        out.append((pos, word[-max_actions_per_word:]))  # cap: keep the last actions
    return out


def all_words(users: list[Any], times: list[int], **rules: Any) -> dict[Any, list[tuple[int, list[int]]]]:
    """Words of every user; action indices refer to positions in the input lists."""
    by_user: dict[Any, list[int]] = {}
    for i, u in enumerate(users):
        by_user.setdefault(u, []).append(i)
    out = {}
    for u in sorted(by_user):
        rows = by_user[u]
        words = user_words([times[i] for i in rows], **rules)
        out[u] = [(pos, [rows[i] for i in idx]) for pos, idx in words]
    return out


def drop_duplicates(rows: list[dict[str, Any]], columns: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Rows without repeats: a row equal to an earlier one in every column listed is dropped
    (the user, the time at full resolution and every attribute column read)."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in rows:
        key = tuple(r[c] for c in columns)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(rows) - len(out)


def vocabulary(values: list[Any], min_count: int = 1, max_vocab: int | None = None) -> list[Any]:
    """Known values in id order (id = index + 2): count descending, then value ascending."""
    counts = Counter(v for v in values if v is not None)
    known = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return known if max_vocab is None else known[: max(0, max_vocab - 2)]


def encode(value: Any, vocab: list[Any]) -> int:
    """Id of a value: 2.. for known values, 1 for null and unknown."""
    ids = {v: i + 2 for i, v in enumerate(vocab)}
    return 1 if value is None else ids.get(value, 1)


def segment_reference(
    rows: list[dict[str, Any]],
    *,
    user: str,
    time: str,
    attributes: list[dict[str, Any]],
    window: tuple[int, int],
    timezone: str,
    rule: str,
    position_unit: str,
    day_start_hour: int = 4,
    gap_minutes: float = 30.0,
    max_words: int = 128,
    max_actions_per_word: int = 32,
    word_overflow: str = "cap",
) -> tuple[dict[Any, list[tuple[int, list[tuple[Any, ...]]]]], dict[str, list[Any]], Counter]:
    """One segment of a small log, every rule of FORMATS.md §2-3 in order.

    ``rows`` hold the user id, the time in integer UTC microseconds (or None) and each attribute's
    raw column; ``attributes`` are ``{"name", "column", "min_count", "max_vocab", "buckets"}``
    (column ``@hour``/``@weekday`` for derived ones).  Returns (per user in id order: [(position, [the
    kept actions' attribute values, None for unknown])], the vocabularies in id order, the
    dropped rows by reason).
    """
    start, end = window
    dropped: Counter = Counter()
    good = []
    for r in rows:
        if r[user] is None or r[user] == "":
            dropped["null_user"] += 1
        elif r[time] is None:
            dropped["null_time"] += 1
        elif not start <= r[time] // 1_000_000 < end:
            dropped["outside_window"] += 1
        else:
            good.append(r)

    def value(r: dict[str, Any], a: dict[str, Any]) -> Any:
        if a["column"] == "@hour":
            return hour_of_day(r[time] // 1_000_000, timezone)
        if a["column"] == "@weekday":
            return weekday(r[time] // 1_000_000, timezone)
        if a.get("buckets") is not None:
            return bucket(r[a["column"]], a["buckets"])
        return r[a["column"]]

    vocabs = {a["name"]: vocabulary([value(r, a) for r in good], a.get("min_count", 1), a.get("max_vocab"))
              for a in attributes}
    # Duplicates are equal in user, time and every attribute's value (bucketed: its bucket).
    read = [a for a in attributes if not a["column"].startswith("@")]
    keyed = [{"_row": r, "_key": (r[user], r[time], *(value(r, a) for a in read))} for r in good]
    kept_keyed, dropped["duplicate"] = drop_duplicates(keyed, ["_key"])
    kept = [k["_row"] for k in kept_keyed]
    words = all_words([r[user] for r in kept], [r[time] // 1_000_000 for r in kept], rule=rule,
                      position_unit=position_unit, timezone=timezone, window_start_utc=start,
                      day_start_hour=day_start_hour, gap_minutes=gap_minutes, max_words=max_words,
                      max_actions_per_word=max_actions_per_word, word_overflow=word_overflow)
    known = {name: set(v) for name, v in vocabs.items()}

    def action(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(v if (v := value(r, a)) in known[a["name"]] else None for a in attributes)

    values = {u: [(pos, [action(kept[i]) for i in idx]) for pos, idx in ws] for u, ws in words.items()}
    return values, vocabs, +dropped


def decoded_words(data: Any, segment: str) -> dict[Any, list[tuple[int, list[tuple[Any, ...]]]]]:
    """A tokenized dataset's words of one segment in :func:`segment_reference`'s form (ids decoded
    through the vocabularies; unknown is None), for users with at least one word."""
    seg = data.segment(segment)
    vocab = {a: [None, None] + data.vocab(segment, a).to_pylist() for a in seg.attributes}
    wo = seg.word_offsets()
    out = {}
    for u, uid in enumerate(data.user_ids.to_pylist()):
        w0, w1 = int(seg.user_word_offsets[u]), int(seg.user_word_offsets[u + 1])
        if w0 == w1:
            continue
        out[uid] = [
            (int(seg.word_pos[w]),
             [tuple(vocab[a][int(x)] for a, x in zip(seg.attributes, row)) for row in seg.attr_ids[wo[w]: wo[w + 1]]])
            for w in range(w0, w1)
        ]
    return out
