"""Synthetic e-commerce behaviour logs with planted, learnable structure (``userbert-engine synth``).

Generative story (the shared structure is in :mod:`tokenizer.synthetic.world`, the per-user
draws in :mod:`tokenizer.synthetic.events`):

- Each user has a sparse mixture over latent topics; a topic is a Zipf-like distribution over
  genres, a genre has shops (a few dominate) and a price level.  Users also have three
  favourite (genre, shop) pairs that they return to, a heavy-tailed (lognormal) activity
  level, a preferred hour of day, a preferred channel and device, and a price offset.
- Gender, age and region depend on the topics; ``is_parent`` and the campaign response depend
  on the topics (plus age / activity), so both are predictable from behaviour, not perfectly.
- Long-term events (purchases, point usage) fall on purchase days over the whole window, with
  weekend and sale-day seasonality; point usage follows a purchase on the same day.
- Short-term events (page views, clicks, searches) come in sessions over the last
  ``short_days`` days: seconds-to-minutes gaps inside a session, hours between sessions.
  Each session follows one topic of the user's *current* mixture, which has drifted from the
  long-term one for half of the users.
- ``next_genre`` labels are the distinct genres of purchases in the ``future_days`` after the
  window, drawn from the current mixture and the favourites, so a model that reads a user's
  history (and the recent sessions) beats global popularity.

Everything is vectorised per chunk of users and written chunk by chunk, so memory does not
grow with ``n_users``.  Each chunk has its own random stream derived from (seed, chunk index),
and the world from the seed alone: the output is a function of the seed and the keyword
arguments (``chunk_users`` included), not of ``progress`` or timing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import zoneinfo
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import tokenizer.synthetic.events as ev
from common.progress import Bar
from tokenizer.schema import SchemaConfig, load_schema, parse_time, schema_from_dict
from tokenizer.synthetic.world import (
    CHANNELS,
    DEVICES,
    GENDERS,
    LONG_ACTIONS,
    N_REGIONS,
    SHORT_ACTIONS,
    World,
    build_world,
    calibrate_intercept,
)

EXPENSE_BUCKETS = [300.0, 1000.0, 2000.0, 3000.0, 5000.0, 10000.0, 20000.0, 50000.0]  # yen
AGE_BUCKETS = [18.0, 25.0, 35.0, 45.0, 55.0, 65.0]
TS_KEY_BITS = 36  # (user, time) sort key = row << 36 | ms since window start (2**36 ms = 795 days)
# Without the stored Arrow schema, dictionary-typed string columns read back as plain strings,
# and timestamp[ms, tz=UTC] still reads back as timestamp[ms, tz=UTC].
PARQUET_OPTS = {"store_schema": False}


def generate(
    out_dir: str | Path,
    n_users: int,
    seed: int = 0,
    *,
    chunk_users: int = 20_000,
    progress: bool = True,
    n_topics: int = 24,
    n_genres: int = 2_000,
    n_shops: int = 20_000,
    long_events_per_user: float = 24.0,
    short_events_per_user: float = 40.0,
    session_length: float = 6.0,
    topics_per_user: int = 4,
    topic_concentration: float = 0.5,
    activity_sigma: float = 1.0,
    window_start: str = "2026-01-01T00:00:00",
    window_days: int = 90,
    short_days: int = 7,
    future_days: int = 14,
    timezone: str = "Asia/Tokyo",
    parent_label_fraction: float = 0.5,
    parent_rate: float = 0.35,
    responder_rate: float = 0.04,
    scramble_ids: bool = True,
    event_order: str = "user",
) -> dict[str, Any]:
    """Write synthetic logs, labels and a schema into ``out_dir``; return the summary.

    Layout: ``long/part-XXXXX.parquet`` and ``short/part-XXXXX.parquet`` (one file per chunk
    of ``chunk_users`` users, events sorted by user then time), ``users.parquet``,
    ``labels/{targeting,is_parent,next_genre}.parquet``, ``schema.toml`` and ``SYNTH.json``
    (this summary).  ``*_events_per_user`` are target means; the realised counts are in the
    summary.  A user's topic mixture has ``topics_per_user`` slots with Dirichlet
    (``topic_concentration``) weights: smaller concentrations focus users on fewer topics.
    ``activity_sigma`` is the lognormal spread of per-user activity (the heavy tail).
    ``event_order`` is the row order within each event file: "user" (by user, then time),
    "time" (by time, users interleaved, as a log is written) or "shuffle" (random).
    """
    if event_order not in ("user", "time", "shuffle"):
        raise ValueError(f"event_order must be 'user', 'time' or 'shuffle', got {event_order!r}")
    if n_users < 1 or chunk_users < 1:
        raise ValueError("n_users and chunk_users must be >= 1")
    if not 0 < short_days <= window_days <= 700:
        raise ValueError("need 0 < short_days <= window_days <= 700")
    t0 = time.perf_counter()
    out = Path(out_dir)
    for sub in ("long", "short", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for stale in [*(out / "long").glob("part-*.parquet"), *(out / "short").glob("part-*.parquet")]:
        stale.unlink()  # a rerun with fewer users must not leave a previous run's chunks behind

    start_local = dt.datetime.fromisoformat(window_start)
    end_local = start_local + dt.timedelta(days=window_days)
    short_local = end_local - dt.timedelta(days=short_days)
    t_start = parse_time(window_start, timezone, "window_start")
    t_end = parse_time(end_local.isoformat(), timezone, "window_end")
    tz = zoneinfo.ZoneInfo(timezone)
    # UTC offset of each local day (taken at noon), so zones with DST get the right instants.
    day_offset = np.array([
        (start_local + dt.timedelta(days=d, hours=12)).replace(tzinfo=tz).utcoffset().total_seconds()
        for d in range(window_days + 1)
    ])

    knobs = ev.Knobs(
        window_days=window_days, short_days=short_days, future_days=future_days,
        long_events_per_user=long_events_per_user, short_events_per_user=short_events_per_user,
        session_length=session_length, topics_per_user=topics_per_user,
        topic_concentration=topic_concentration, activity_sigma=activity_sigma,
        parent_label_fraction=parent_label_fraction,
    )
    world = build_world(
        np.random.default_rng([seed, 2**32]), n_topics=n_topics, n_genres=n_genres, n_shops=n_shops,
        window_weekday0=start_local.weekday(), window_days=window_days, short_days=short_days,
    )
    # Label intercepts that give the requested base rates, fitted on a pilot sample of users.
    pilot = ev.draw_users(np.random.default_rng([seed, 2**32 + 1]), 20_000, world, knobs)
    world.b_parent = calibrate_intercept(pilot["parent_logit"], parent_rate)
    world.b_target = calibrate_intercept(pilot["target_logit"], responder_rate)

    time_base = {"t_start": t_start, "t_end": t_end, "day_offset": day_offset,
                 "t_local0": t_start + day_offset[0]}
    genre_width = max(4, len(str(n_genres - 1)))
    names = {
        "genre": pa.array([f"g{g:0{genre_width}d}" for g in range(n_genres)]),
        "region": pa.array([f"JP-{r + 1:02d}" for r in range(N_REGIONS)]),
    }
    writers = _Writers(out)
    counts: dict[str, int] = {}
    n_chunks = (n_users + chunk_users - 1) // chunk_users
    bar = Bar("synth", n_users, progress, unit="users", scale=False)
    # Parquet encoding runs on a writer thread (pyarrow releases the GIL) while the next chunk
    # is generated; at most one chunk waits, so memory stays at about two chunks.
    pool = ThreadPoolExecutor(max_workers=1)
    pending: Future | None = None
    try:
        for c in range(n_chunks):
            lo, hi = c * chunk_users, min(n_users, (c + 1) * chunk_users)
            rng = np.random.default_rng([seed, c])
            tables, chunk_counts = _chunk(rng, _user_ids(np.arange(lo, hi), scramble_ids), world, knobs,
                                          time_base, names)
            if event_order != "user":
                # Its own stream, so that the events themselves do not depend on the order.
                order_rng = np.random.default_rng([seed, c, 2**32 + 2])
                for key in ("long", "short"):
                    tables[key] = _reorder(tables[key], event_order, order_rng)
            for key, value in chunk_counts.items():
                counts[key] = counts.get(key, 0) + value
            if pending is not None:
                pending.result()
            pending = pool.submit(writers.write_chunk, c, tables)
            bar.update(hi - lo)
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)
        writers.close()
        bar.close()

    schema = synthetic_schema(start_local, end_local, short_local, timezone)
    (out / "schema.toml").write_text(schema.to_toml())
    load_schema(out / "schema.toml")  # fail here, not in the tokenizer, if it does not load

    elapsed = time.perf_counter() - t0
    n_events = counts["long_events"] + counts["short_events"]
    summary = {
        "n_users": n_users,
        "seed": seed,
        "params": {
            "chunk_users": chunk_users, "n_topics": n_topics, "n_genres": n_genres, "n_shops": n_shops,
            "long_events_per_user": long_events_per_user, "short_events_per_user": short_events_per_user,
            "session_length": session_length, "topics_per_user": topics_per_user,
            "topic_concentration": topic_concentration, "activity_sigma": activity_sigma,
            "window_start": window_start, "window_days": window_days, "short_days": short_days,
            "future_days": future_days, "timezone": timezone, "parent_label_fraction": parent_label_fraction,
            "parent_rate": parent_rate, "responder_rate": responder_rate, "scramble_ids": scramble_ids,
            "event_order": event_order,
        },
        "window": {"start": start_local.isoformat(), "end": end_local.isoformat(),
                   "short_start": short_local.isoformat(),
                   "future_end": (end_local + dt.timedelta(days=future_days)).isoformat()},
        "counts": {"events": n_events, **counts},
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) + ["schema.toml"],
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(n_events / elapsed),
    }
    (out / "SYNTH.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synthetic_schema(start: dt.datetime, end: dt.datetime, short_start: dt.datetime,
                     timezone: str) -> SchemaConfig:
    """The schema of the generated logs (relative paths: it lives beside them)."""
    return schema_from_dict({
        "data": {"users": "users.parquet", "window_start": start.isoformat(), "window_end": end.isoformat(),
                 "timezone": timezone, "user_column": "user_id"},
        "segments": {
            "long": {
                "path": "long/*.parquet", "time_column": "ts", "word_rule": "daily", "day_start_hour": 4,
                "position_unit": "day", "max_words": 128, "max_actions_per_word": 32,
                "attributes": [
                    {"name": "action", "dim": 8},
                    {"name": "channel", "dim": 8},
                    {"name": "expense", "column": "price", "dim": 8, "buckets": EXPENSE_BUCKETS},
                    {"name": "shop", "dim": 48, "min_count": 2, "max_vocab": 100_000},
                    {"name": "genre", "dim": 32, "max_vocab": 20_000},
                    {"name": "hour", "column": "@hour", "dim": 8},
                ],
            },
            "short": {
                "path": "short/*.parquet", "time_column": "ts", "word_rule": "session", "gap_minutes": 30.0,
                "position_unit": "hour", "window_start": short_start.isoformat(), "max_words": 128,
                "max_actions_per_word": 32,
                "attributes": [
                    {"name": "action", "dim": 8},
                    {"name": "shop", "dim": 48, "min_count": 2, "max_vocab": 100_000},
                    {"name": "genre", "dim": 32, "max_vocab": 20_000},
                    {"name": "device", "dim": 8},
                ],
            },
        },
        "user_attributes": [
            {"name": "gender"},
            {"name": "age", "buckets": AGE_BUCKETS},
            {"name": "region"},
        ],
    })


# ---------------------------------------------------------------------------------------------
def _user_ids(index: np.ndarray, scramble: bool) -> np.ndarray:
    """Row index -> user id.  Scrambled ids (an odd multiplier mod 2**40 is a bijection) keep
    consumers from assuming dense, ordered ids."""
    if not scramble:
        return index.astype(np.int64)
    x = index.astype(np.uint64) * np.uint64(0x9E3779B1) + np.uint64(0x2545F491)
    return (x & np.uint64(2**40 - 1)).astype(np.int64)


def _events_table(events: dict, ids: np.ndarray, tb: dict, cols: dict[str, Any]) -> pa.Table:
    """Arrow table of the events sorted by (user, time); events at or after the window end
    (a session or purchase day running past it) are dropped."""
    day = np.minimum(events["day"], len(tb["day_offset"]) - 1)
    ts = np.floor((tb["t_local0"] + events["local_s"] - tb["day_offset"][day]) * 1000.0).astype(np.int64)
    keep = np.flatnonzero(ts < tb["t_end"] * 1000)
    key = (events["uid"][keep].astype(np.int64) << TS_KEY_BITS) | (ts[keep] - tb["t_start"] * 1000)
    if not np.all(key[1:] >= key[:-1]):  # groups were built in order; only overlaps need sorting
        keep = keep[np.argsort(key, kind="stable")]
    out = {"user_id": pa.array(ids[events["uid"][keep]]),
           "ts": pa.array(ts[keep], type=pa.timestamp("ms", tz="UTC"))}
    for name, (values, vocab) in cols.items():
        out[name] = _strings(vocab, values[keep]) if vocab is not None else pa.array(values[keep])
    return pa.table(out)


def _reorder(table: pa.Table, order: str, rng: np.random.Generator) -> pa.Table:
    if order == "time":
        ts = table.column("ts").combine_chunks().cast(pa.int64()).to_numpy()
        return table.take(pa.array(np.argsort(ts, kind="stable")))
    return table.take(pa.array(rng.permutation(table.num_rows)))


def _strings(vocab: tuple[str, ...] | pa.Array, codes: np.ndarray) -> pa.Array:
    """Codes -> a string column, as a dictionary array: no per-row strings are built, and the
    Parquet writer stores it as a plain (dictionary-encoded) string column (see PARQUET_OPTS)."""
    values = vocab if isinstance(vocab, pa.Array) else pa.array(vocab)
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32, copy=False)), values)


def _chunk(rng: np.random.Generator, ids: np.ndarray, world: World, knobs: ev.Knobs, tb: dict,
           names: dict) -> tuple[dict[str, pa.Table], dict[str, int]]:
    users = ev.draw_users(rng, len(ids), world, knobs)
    le = ev.long_events(rng, world, users, knobs)
    se = ev.short_events(rng, world, users, knobs)
    fuid, fgenre = ev.future_genres(rng, world, users, knobs)
    lab = ev.labels(rng, world, users, knobs)

    long_t = _events_table(le, ids, tb, {
        "action": (le["action"], LONG_ACTIONS), "channel": (le["channel"], CHANNELS),
        "price": (le["price"], None), "shop": (le["shop"], None), "genre": (le["genre"], names["genre"]),
    })
    short_t = _events_table(se, ids, tb, {
        "action": (se["action"], SHORT_ACTIONS), "shop": (se["shop"], None),
        "genre": (se["genre"], names["genre"]), "device": (se["device"], DEVICES),
    })
    gender = users["gender"]
    users_t = pa.table({
        "user_id": pa.array(ids),
        "gender": pa.DictionaryArray.from_arrays(pa.array(gender.astype(np.int32), mask=gender < 0),
                                                 pa.array(GENDERS)),
        "age": pa.array(users["age"], mask=users["age_null"]),
        "region": _strings(names["region"], users["region"]),
    })
    per_user = np.bincount(fuid, minlength=len(ids))
    has = np.flatnonzero(per_user)
    offsets = np.concatenate([[0], np.cumsum(per_user[has])]).astype(np.int32)
    next_t = pa.table({
        "user_id": pa.array(ids[has]),
        "label": pa.ListArray.from_arrays(pa.array(offsets), pc.take(names["genre"], pa.array(fgenre))),
    })
    label_t = {
        "labels/is_parent": pa.table({"user_id": pa.array(ids[lab["parent_rows"]]),
                                      "label": pa.array(lab["parent"])}),
        "labels/targeting": pa.table({"user_id": pa.array(ids[lab["target_rows"]]),
                                      "label": pa.array(lab["target"])}),
    }
    n_point = int(np.count_nonzero(long_t["action"].combine_chunks().indices.to_numpy() == 1))
    counts = {
        "long_events": long_t.num_rows, "purchase": long_t.num_rows - n_point, "point_use": n_point,
        "short_events": short_t.num_rows, "sessions_drawn": int(se["n_sessions"]),
        "events_past_window_end": len(le["uid"]) + len(se["uid"]) - long_t.num_rows - short_t.num_rows,
        "users_with_long": int(pc.count_distinct(long_t["user_id"]).as_py()),
        "users_with_short": int(pc.count_distinct(short_t["user_id"]).as_py()),
        "targeting_pos": int(lab["target"].sum()), "targeting_neg": int((lab["target"] == 0).sum()),
        "is_parent_labelled": len(lab["parent"]), "is_parent_pos": int(lab["parent"].sum()),
        "next_genre_users": len(has),
    }
    tables = {"long": long_t, "short": short_t, "users": users_t, "labels/next_genre": next_t, **label_t}
    return tables, counts


class _Writers:
    """Writes a chunk's tables: event parts, and a row group per chunk of the other tables."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.open: dict[str, pq.ParquetWriter] = {}

    def write_chunk(self, c: int, tables: dict[str, pa.Table]) -> None:
        for name, table in tables.items():
            if name in ("long", "short"):  # event logs: one file per chunk
                # Cheaper to encode and smaller: dictionaries only where values repeat, min/max
                # statistics only on the id and time, and time as deltas (sorted per user).
                pq.write_table(table, self.out / name / f"part-{c:05d}.parquet", **PARQUET_OPTS,
                               use_dictionary=[col for col in table.column_names if col != "ts"],
                               write_statistics=["user_id", "ts"],
                               column_encoding={"ts": "DELTA_BINARY_PACKED"})
                continue
            if name not in self.open:
                self.open[name] = pq.ParquetWriter(self.out / f"{name}.parquet", table.schema, **PARQUET_OPTS)
            self.open[name].write_table(table)

    def close(self) -> None:
        for w in self.open.values():
            w.close()
