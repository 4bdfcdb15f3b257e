"""Event logs shaped like real ones, for tests and benchmarks that must not flatter the tokenizer.

The planted-structure generator (``tokenizer.synthetic.generate``) gives every user ~64 events over
catalogues of a few thousand values, in tidy per-segment files.  Real logs are not like that:

- **one table** of all events with an ``event_type`` column (purchases and views mixed), the way
  clickstream exports arrive; the schema routes the types to the two segments;
- **Zipf popularity** over large catalogues: items 10^3 to 10^7 distinct, shops, genres, search
  queries; ids as strings (``"item0001234"``) or as integers;
- **heavy-tailed activity**: events per user follow a Pareto law, so most users have a handful
  of events and a few (bots, power users) have 10^4 or more;
- events in **sessions** (bursts a few minutes apart) on random days of a 90-day window;
- **rows in arbitrary order**, spread over several files of several row groups each.

Generation is vectorised numpy, one file at a time (memory stays at one file's rows), and
deterministic in ``seed``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq

from tokenizer.schema import load_schema, schema_from_dict

EVENT_TYPES = ("purchase", "view", "cart", "search")
_P_TYPE = (0.08, 0.72, 0.12, 0.08)
DEVICES = ("ios", "android", "web", "tablet", "tv")
WINDOW_START = "2026-01-01T00:00:00"
WINDOW_DAYS = 90
_T0_MS = int(dt.datetime.fromisoformat(WINDOW_START).replace(tzinfo=dt.UTC).timestamp()) * 1000


@dataclass(frozen=True)
class LogShape:
    """Sizes of a realistic log: events, users, catalogue cardinalities and the Zipf exponent."""

    events: int
    users: int | None = None  # default: events // 40
    items: int = 100_000
    shops: int = 10_000
    genres: int = 1_000
    queries: int = 50_000
    zipf: float = 1.1  # popularity exponent of every catalogue
    activity_alpha: float = 1.1  # Pareto tail of events per user (smaller: heavier)
    string_ids: bool = True  # item/shop/query ids as strings; False: int64
    string_users: bool = False
    files: int = 4
    row_group_rows: int = 250_000
    seed: int = 0

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(1, self.events // 40)


class _Zipf:
    """Draws ids 0..n-1 with P(rank k) ~ k^-s; ranks are scattered over the ids (a fixed
    permutation), so popular values are not the smallest ones."""

    def __init__(self, n: int, s: float, rng: np.random.Generator) -> None:
        w = np.arange(1, n + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(w)
        self.cdf /= self.cdf[-1]
        self.perm = rng.permutation(n).astype(np.int64)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        rank = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(rank, len(self.perm) - 1)]


def _activity(shape: LogShape, rng: np.random.Generator) -> np.ndarray:
    """Share of all events of each user: Pareto weights, normalised (a few users dominate)."""
    w = rng.pareto(shape.activity_alpha, shape.n_users) + 1.0
    return w / w.sum()


def _labels(prefix: str, ids: np.ndarray, width: int) -> pa.Array:
    # Zero-padded, like real SKUs; built by Arrow's string kernels (no Python loop per row).
    digits = pc.utf8_lpad(pa.array(ids).cast(pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _file_table(shape: LogShape, users: tuple[np.ndarray, np.ndarray], cats: dict[str, _Zipf],
                rng: np.random.Generator) -> pa.Table:
    """One file's rows: ``users`` = (user index of each row, in arbitrary order; its event count)."""
    n = len(users[0])
    # Sessions: a user's events come in bursts.  A user with n events has ~n/6 sessions, each at a
    # pseudo-random instant of the window (a hash of user and session number); an event picks one
    # of its user's sessions and lands a few minutes into it.
    idx, n_events_of_user = users
    uid = (idx * 2654435761 + 12345) % (1 << 40)
    k = (rng.random(n) * np.maximum(1, n_events_of_user // 6)).astype(np.int64)
    h = (idx * 0x9E3779B1 + k * 0x85EBCA77 + 0x165667B1) % (1 << 31)
    start_s = (h * (WINDOW_DAYS * 86400 - 4 * 3600)) >> 31
    offset = np.minimum(rng.exponential(240.0, n), 3 * 3600).astype(np.int64)
    ts_ms = _T0_MS + (start_s + offset) * 1000 + rng.integers(0, 1000, n)
    etype = rng.choice(len(EVENT_TYPES), n, p=_P_TYPE)
    item = cats["item"].draw(rng, n)
    genre = (item * 2654435761) % shape.genres  # an item has one genre
    shop = cats["shop"].draw(rng, n)
    query = np.where(etype == 3, cats["query"].draw(rng, n), -1)
    price = np.round(np.exp(rng.normal(7.0, 1.2, n)), 0)
    device = rng.choice(len(DEVICES), n, p=(0.35, 0.35, 0.2, 0.07, 0.03))

    def ids(prefix: str, x: np.ndarray, width: int, null: np.ndarray | None = None) -> pa.Array:
        a = _labels(prefix, np.maximum(x, 0), width) if shape.string_ids else pa.array(x, pa.int64())
        return a if null is None else pc.if_else(pa.array(~null), a, pa.scalar(None, a.type))

    user_col = _labels("u", uid, 9) if shape.string_users else pa.array(uid, pa.int64())
    return pa.table({
        "user_id": user_col,
        "ts": pa.array(ts_ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "event_type": pa.DictionaryArray.from_arrays(pa.array(etype, pa.int32()), pa.array(EVENT_TYPES)).cast(
            pa.string()),
        "item_id": ids("item", item, 8),
        "shop_id": ids("shop", shop, 6),
        "genre": pa.array(genre, pa.int64()),
        "query": ids("q", query, 6, null=query < 0),
        "price": pa.array(price, pa.float64()),
        "device": pa.array(np.array(DEVICES, dtype=object)[device].tolist(), pa.string()),
    })


def generate_tables(shape: LogShape):
    """Yield the log's files as Arrow tables, one at a time (rows in arbitrary order)."""
    rng = np.random.default_rng(shape.seed)
    cats = {"item": _Zipf(shape.items, shape.zipf, rng), "shop": _Zipf(shape.shops, shape.zipf, rng),
            "query": _Zipf(shape.queries, shape.zipf, rng)}
    share = _activity(shape, rng)
    per_user = rng.multinomial(shape.events, share)  # exact total; heavy users get their share
    # Each file holds a random part of every user's events (users appear in several files).
    order = np.repeat(np.arange(shape.n_users, dtype=np.int64), per_user)
    rng.shuffle(order)
    bounds = [shape.events * i // shape.files for i in range(shape.files + 1)]
    for f in range(shape.files):
        users_f = order[bounds[f]: bounds[f + 1]]
        yield _file_table(shape, (users_f, per_user[users_f]), cats, np.random.default_rng([shape.seed, f]))


def schema_dict(path: str = "events", **segment_extra) -> dict:
    """The schema of a realistic log: purchases as daily words, everything else as sessions."""
    end = (dt.datetime.fromisoformat(WINDOW_START) + dt.timedelta(days=WINDOW_DAYS)).isoformat()
    common = {"path": path, "time_column": "ts", "segment_column": "event_type", **segment_extra}
    return {
        "data": {"window_start": WINDOW_START, "window_end": end, "timezone": "Europe/Berlin",
                 "user_column": "user_id"},
        "segments": {
            "long": {**common, "segment_values": ["purchase"], "word_rule": "daily", "position_unit": "day",
                     "attributes": [{"name": "item", "column": "item_id", "dim": 32, "max_vocab": 1_000_000},
                                    {"name": "shop", "column": "shop_id", "dim": 16},
                                    {"name": "genre", "dim": 16},
                                    {"name": "price", "dim": 8, "buckets": [500, 1000, 2000, 5000, 10000]},
                                    {"name": "hour", "column": "@hour", "dim": 8}]},
            "short": {**common, "segment_values": ["view", "cart", "search"], "word_rule": "session",
                      "position_unit": "hour",
                      "attributes": [{"name": "action", "column": "event_type", "dim": 8},
                                     {"name": "item", "column": "item_id", "dim": 32, "min_count": 2},
                                     {"name": "query", "dim": 16, "min_count": 2},
                                     {"name": "device", "dim": 8}]},
        },
    }


STRING_ENCODINGS = ("plain", "dictionary", "large", "view")


def _fits_int32(col: pa.ChunkedArray) -> bool:
    lo, hi = pc.min_max(col).values()
    return lo.as_py() is None or (-(2**31) <= lo.as_py() and hi.as_py() < 2**31)


def _encode_strings(table: pa.Table, encoding: str) -> pa.Table:
    """String columns as plain ``string``, Arrow ``dictionary<int32, string>``, ``large_string`` or
    ``string_view``."""
    to = {"plain": pa.string(), "dictionary": pa.dictionary(pa.int32(), pa.string()), "large": pa.large_string(),
          "view": pa.string_view()}[encoding]
    fields = [pa.field(f.name, to if pa.types.is_string(f.type) else f.type) for f in table.schema]
    return table.cast(pa.schema(fields))


def write_logs(out: Path, shape: LogShape, fmt: str = "parquet", encoding: str = "plain",
               int_width: int = 64) -> Path:
    """Write the log under ``out/events/`` in one format and ``out/schema.toml``; returns ``out``.

    ``fmt``: ``parquet``, ``csv`` or ``ipc`` (Arrow IPC files).  ``encoding`` (Parquet and IPC): how
    string columns are stored (:data:`STRING_ENCODINGS`; Parquet uses dictionary pages only for
    ``dictionary``).  ``int_width``: 32 stores the integer ids (users, items, shops, queries) as int32,
    where they fit."""
    out = Path(out)
    ev = out / "events"
    ev.mkdir(parents=True, exist_ok=True)
    if encoding not in STRING_ENCODINGS:
        raise ValueError(f"encoding: one of {STRING_ENCODINGS}, got {encoding!r}")
    for f, table in enumerate(generate_tables(shape)):
        if int_width == 32:
            table = table.cast(pa.schema([pa.field(fl.name, pa.int32() if fl.type == pa.int64() and _fits_int32(
                table.column(fl.name)) else fl.type) for fl in table.schema]))
        if fmt != "csv":
            table = _encode_strings(table, encoding)
        if fmt == "parquet":
            pq.write_table(table, ev / f"part-{f:03d}.parquet", row_group_size=shape.row_group_rows,
                           use_dictionary=encoding == "dictionary")
        elif fmt == "csv":
            pacsv.write_csv(table.set_column(1, "ts", table.column("ts").cast(pa.int64())), ev / f"part-{f:03d}.csv")
        elif fmt == "ipc":
            feather.write_feather(table, ev / f"part-{f:03d}.arrow", compression="uncompressed",
                                  chunksize=shape.row_group_rows)
        else:
            raise ValueError(f"fmt: parquet, csv or ipc, got {fmt!r}")
    glob = {"parquet": "events/*.parquet", "csv": "events/*.csv", "ipc": "events/*.arrow"}[fmt]
    extra = {"time_unit": "ms"} if fmt == "csv" else {}
    schema = schema_from_dict(schema_dict(glob, **extra), out)
    (out / "schema.toml").write_text(schema.to_toml())
    load_schema(out / "schema.toml")
    (out / "SHAPE.json").write_text(json.dumps({**asdict(shape), "format": fmt, "encoding": encoding,
                                                "int_width": int_width}, indent=2) + "\n")
    return out
