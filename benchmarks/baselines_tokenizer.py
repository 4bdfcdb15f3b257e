"""The tokenizer benchmark's baselines: the same behavioural words computed the way a competent
user of a dataframe library would compute them, in Polars, in DuckDB SQL and in pandas.

Each follows docs/FORMATS.md §1-3 for the schemas the benchmarks use (the planted-structure
synthetic logs and tokenizer/synthetic/realistic.py): rows routed to segments by ``segment_column``;
bad rows dropped (null or empty user, null time, outside the window); the vocabularies counted
over the good rows (duplicates included: they are found after counting), ids by count
descending then value ascending, ``min_count`` and ``max_vocab`` (the two reserved ids
counted), 1 for null and unknown; duplicate events (same user, microsecond and raw value of
every attribute column read) dropped keeping the first in input order; a stable sort by (user,
whole second); daily words (local 04:00-to-04:00 day, DST-correct) or session words (gap >
``gap_minutes``); the last ``max_words`` words of a user and the last ``max_actions_per_word``
actions of a word; word position in local days since the window's first day, or in hours since
the window start; ``@hour``/``@weekday`` from local time; bucketed numbers (bucket = number of
boundaries <= x, NaN/null -> null).  Each writes ``OUT/<segment>.parquet``: one row per user with
the user id, ``word_pos``, ``word_len`` and one list of attribute ids per attribute (over the
kept actions, word after word), the layout ``baseline_words`` in
benchmarks/test_tokenizer_baselines.py reads.  benchmarks/test_tokenizer_baselines.py checks that
all three give exactly the tokenizer's words.  (User attributes are left out: a small table.)

How each is written (what a competent user would write; each choice below was timed against
its alternatives, interleaved, on realistic logs of 5M and 20M events):

- **Polars** (``polars_pipeline``): per segment one lazy ``scan_parquet`` (the segment filter and
  the projection go into the scan; ``shared_read=True`` reads a shared table once into memory
  instead: a little faster at 5M, slower and 40% more memory at 20M), its good rows collected
  once, string values as ``pl.Categorical`` (hashed once; 15% less time at 20M events, even
  at 5M); every value's vocabulary rank (count desc, value asc) by one ``replace_strict`` lookup, the
  id following from the rank by arithmetic; the stable (user, second) sort as two stable one-key
  sorts (``sort(maintain_order=True)`` on two keys was 2-3x slower); repeated events by
  ``is_first_distinct`` over (user, microsecond, rank codes) on the rows of the sorted runs of
  equal (user, second) only (over all rows it cost more than the sort); word starts from
  ``shift``/``diff`` and a ``cum_sum``; the user's last word, each word's position and first/last
  rows by forward and backward fills (no per-row ``.over`` windows); one ``group_by(user)`` with
  list aggregations.  ``engine``: ``"streaming"`` (Polars 2's default; ``"in-memory"`` took ~15%
  more CPU).  Threads: Polars' default (all cores) unless ``POLARS_MAX_THREADS`` is set.
- **DuckDB** (``duckdb_pipeline``): per segment one ``COPY (...) TO`` Parquet statement over
  ``read_parquet`` (filters and projection pushed into the scan; ``file_index``/``file_row_number``
  give the input order that breaks time ties): each vocabulary as ``GROUP BY`` value + ``row_number()
  OVER (ORDER BY count DESC, value)``, one hash join per attribute giving the value's rank and id;
  repeated events by ``GROUP BY`` (user, microsecond, ranks) keeping ``min`` input position (a
  ``QUALIFY row_number() OVER (PARTITION BY ...) = 1`` window was 3x slower); word starts by
  ``lag``, word numbers, the user's word count and row numbers by one running-``sum`` /
  ``row_number`` window; one ``GROUP BY (user, word)`` with an ordered ``list`` sliced to the last
  actions, the last words by a filter on the word number, one ``GROUP BY user``.  ``PRAGMA
  threads`` (2) and ``memory_limit`` are set; ``shared_read=True`` loads a shared table into a
  temporary table first (no faster).
- **pandas** (``pandas_pipeline``): the same steps with ``sort_values(kind="stable")``,
  ``groupby``/``transform`` and ``cumsum`` (too slow to run at the benchmark's sizes; kept as a
  third check on the rules).

Run one as a command (what benchmarks/tokenizer_vs_baselines.py times)::

    python benchmarks/baselines_tokenizer.py polars --schema S --out DIR [--engine in-memory] [--shared-read]
    python benchmarks/baselines_tokenizer.py duckdb --schema S --out DIR [--threads 2] [--memory-limit 12GB]

It prints one JSON line: words per segment, seconds and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path, as for the tests
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.io import resolve_inputs  # noqa: E402
from tokenizer.schema import DERIVED_COLUMNS, AttributeSpec, SchemaConfig, SegmentSpec  # noqa: E402

_US = {"s": 1_000_000, "ms": 1_000, "us": 1}


@dataclass
class Job:
    """One segment, resolved: its input files, columns, window (UTC seconds) and first day."""

    name: str
    seg: SegmentSpec
    user: str
    files: list[str]
    start: int
    end: int
    day0: int  # local days since the epoch (days from day_start_hour) of the window start
    raw: list[str]  # the attribute columns read (distinct, schema order): the duplicate key

    @property
    def attrs(self) -> list[AttributeSpec]:
        return self.seg.attributes

    @property
    def needs_local(self) -> bool:
        """Whether local time is used (daily words, day positions, @hour/@weekday): converting
        every event's time to the time zone is skipped otherwise."""
        s = self.seg
        return s.word_rule == "daily" or s.position_unit == "day" or any(a.column in DERIVED_COLUMNS
                                                                          for a in s.attributes)

    def columns(self) -> list[str]:
        route = [self.seg.segment_column] if self.seg.segment_column else []
        return list(dict.fromkeys([self.user, self.seg.time_column, *route, *self.raw]))


def jobs(schema: SchemaConfig) -> list[Job]:
    tz = zoneinfo.ZoneInfo(schema.data.timezone)
    out = []
    for name, seg in schema.segments.items():
        start, end = schema.window_seconds(seg)
        if start < 0:
            raise NotImplementedError("the baselines floor times with integer division: windows before 1970")
        offset = int(dt.datetime.fromtimestamp(start, tz).utcoffset().total_seconds())
        day0 = (start + offset - seg.day_start_hour * 3600) // 86400
        raw = list(dict.fromkeys(a.column for a in seg.attributes if a.column not in DERIVED_COLUMNS))
        files = [str(f) for f in resolve_inputs(schema.resolve(seg.path))]
        out.append(Job(name, seg, seg.user_column or schema.data.user_column, files, start, end, day0, raw))
    return out


def _id_name(a: AttributeSpec) -> str:
    return f"id_{a.name}"


# -- Polars -----------------------------------------------------------------------------------------------------
def _pl():
    import polars as pl

    return pl


def _polars_time(dtype, job: Job, timezone: str):
    """(microseconds since the epoch, local wall-clock seconds since the epoch) expressions."""
    pl = _pl()
    c = pl.col(job.seg.time_column)
    if isinstance(dtype, pl.Datetime):
        us = c.dt.epoch("us")
        utc = c if dtype.time_zone else c.dt.replace_time_zone("UTC")
    elif dtype.is_integer() or dtype.is_float():
        unit = job.seg.time_unit
        us = c.cast(pl.Int64) // 1000 if unit == "ns" else c.cast(pl.Int64) * _US[unit]
        utc = pl.from_epoch(us, "us").dt.replace_time_zone("UTC")
    else:
        raise NotImplementedError(f"time column of type {dtype}: the baselines read timestamps and epochs")
    local = utc.dt.convert_time_zone(timezone).dt.replace_time_zone(None).dt.epoch("s")
    return us, local


def _polars_value(a: AttributeSpec, dtype):
    """The attribute's category: derived from local time, bucketed, or the column (floats with
    -0.0 folded into 0.0 and NaN as null; booleans as 0/1)."""
    pl = _pl()
    if a.column == "@hour":
        return (pl.col("_local") // 3600) % 24
    if a.column == "@weekday":
        return (pl.col("_local") // 86400 + 3) % 7
    c = pl.col(a.column)
    if a.buckets is not None:
        x = c.cast(pl.Float64)
        b = pl.sum_horizontal([(x >= float(v)).cast(pl.Int64) for v in a.buckets])
        return pl.when(x.is_null() | x.is_nan()).then(None).otherwise(b)
    if dtype == pl.Boolean:
        return c.cast(pl.Int64)
    if dtype.is_float():
        return (c + 0.0).fill_nan(None)
    return c


def _polars_key(col: str, dtype):
    """A raw column as the duplicate key compares it (floats: -0.0 is 0.0, NaN is null)."""
    pl = _pl()
    c = pl.col(col)
    return ((c + 0.0).fill_nan(None) if dtype.is_float() else c).alias(f"_k_{col}")


def _bucket_only(job: Job) -> list[str]:
    """Raw columns that only bucketed attributes read: the duplicate key needs their values."""
    plain = {a.column for a in job.attrs if a.buckets is None}
    return [c for c in job.raw if c not in plain]


def polars_vocab(values, a: AttributeSpec):
    """Every distinct value of one attribute ranked from 1 by (count desc, value asc), and how many
    of them are known (a prefix of the ranks: count >= min_count, within max_vocab): value of rank
    r has id r + 1 if r <= known, else 1."""
    pl = _pl()
    vc = values.value_counts(name="_n").drop_nulls(values.name)
    by = pl.col(values.name).cast(pl.String) if values.dtype == pl.Categorical else pl.col(values.name)
    vc = vc.sort([pl.col("_n"), by], descending=[True, False])  # strings by value (UTF-8 bytes), not by code
    known = int((vc["_n"] >= a.min_count).sum())
    if a.max_vocab is not None:
        known = min(known, max(0, a.max_vocab - 2))
    return vc.with_row_index("_r", offset=1), known


def polars_words(good, job: Job, engine: str = "streaming"):
    """The words of one segment from its good rows (columns as :func:`polars_good_rows` makes)."""
    pl = _pl()
    seg, user = job.seg, pl.col(job.user)
    # Each value's rank (a dense integer code, 0 for null) by one lookup; the id follows from it
    # by arithmetic, and repeated events are found on the codes instead of the strings.
    codes, ids = [], []
    for a in job.attrs:
        col = good[f"_v_{a.name}"]
        v, known = polars_vocab(col, a)
        if col.dtype == pl.Categorical:  # a lookup table indexed by the category's code
            lut = pl.zeros(int(col.to_physical().max() or 0) + 1, pl.UInt32, eager=True)
            lut = lut.scatter(v[col.name].to_physical(), v["_r"])
            code = pl.lit(lut).gather(pl.col(col.name).to_physical()).fill_null(0)
        else:
            code = pl.col(col.name).replace_strict(v[col.name], v["_r"], default=0, return_dtype=pl.UInt32)
        codes.append(code.alias(f"_c_{a.name}"))
        c = pl.col(f"_c_{a.name}")
        ids.append(pl.when((c > 0) & (c <= known)).then(c.cast(pl.Int32) + 1).otherwise(1).cast(pl.Int32)
                   .alias(_id_name(a)))
    # A stable sort by (user, second) as two stable one-key sorts (time, then user): Polars'
    # multi-key sort with maintain_order is several times slower on the same rows.
    local = ["_local"] if job.needs_local else []
    raw_keys = [f"_k_{c}" for c in _bucket_only(job)]
    df = (good.lazy().select(job.user, "_t", *local, "_us", *raw_keys, *codes)
          .sort("_t", maintain_order=True).sort(job.user, maintain_order=True).collect(engine=engine))
    if seg.drop_duplicates:
        # Repeats of an event share its user and second, so they sit in the runs of equal (user,
        # second) of the sorted rows, in input order: only those rows (a few percent) are hashed.
        # (is_first_distinct over all rows took longer than the sort.)
        same = (user == user.shift(1)) & (pl.col("_t") == pl.col("_t").shift(1))
        key = [job.user, "_us", *[f"_c_{a.name}" for a in job.attrs], *raw_keys]
        runs = df.with_row_index("_i").filter((same | same.shift(-1)).fill_null(False))
        repeats = runs.filter(~pl.struct(key).is_first_distinct())["_i"]
        if len(repeats):
            df = df.filter(~pl.zeros(len(df), pl.Boolean, eager=True).scatter(repeats, True))
    lf = df.lazy().select(job.user, "_t", *local, *ids)
    first_of_user = (user != user.shift(1)).fill_null(True)
    if seg.word_rule == "daily":
        day = (pl.col("_local") - seg.day_start_hour * 3600) // 86400
        new = first_of_user | (day != day.shift(1)).fill_null(True)
    else:
        new = first_of_user | (pl.col("_t").diff() > seg.gap_minutes * 60).fill_null(True)
    if seg.position_unit == "day":
        pos = (pl.col("_local") - seg.day_start_hour * 3600) // 86400 - job.day0
    else:
        pos = (pl.col("_t") - job.start) // 3600
    cap = seg.max_actions_per_word
    row = pl.int_range(pl.len(), dtype=pl.Int64)
    lf = lf.with_columns(
        new.alias("_new"), (user != user.shift(-1)).fill_null(True).alias("_last_of_user"), row.alias("_row"),
        pos.alias("_pos"),
    ).with_columns(
        pl.col("_new").cum_sum().alias("_w"), pl.col("_new").shift(-1, fill_value=True).alias("_end"),
    ).with_columns(
        # the user's last word, each word's position (its first event's) and first and last rows
        pl.when("_last_of_user").then("_w").fill_null(strategy="backward").alias("_w_last"),
        pl.when("_new").then("_pos").fill_null(strategy="forward").cast(pl.Int32).alias("_wpos"),
        pl.when("_new").then("_row").fill_null(strategy="forward").alias("_w_first_row"),
        pl.when("_end").then("_row").fill_null(strategy="backward").alias("_w_last_row"),
    ).filter(
        (pl.col("_w_last") - pl.col("_w") < seg.max_words) & (pl.col("_w_last_row") - pl.col("_row") < cap)
    )
    n = pl.min_horizontal(pl.col("_w_last_row") - pl.col("_w_first_row") + 1, pl.lit(cap)).cast(pl.Int32)
    lf = lf.group_by(job.user).agg(
        pl.col("_wpos").filter("_end").alias("word_pos"), n.filter(pl.col("_end")).alias("word_len"),
        *[pl.col(_id_name(a)) for a in job.attrs],
    )
    return lf.collect(engine=engine)


def polars_good_rows(job: Job, timezone: str, table=None, engine: str = "streaming", categorical: bool = True):
    """The segment's good rows with ``_us``, ``_t`` (UTC seconds), ``_local`` (local seconds),
    ``_v_<attribute>`` values and the ``_k_<column>`` duplicate keys no value stands for.  ``table``:
    the segment's input already read (a shared table), else it is scanned.  ``categorical``:
    string values as ``pl.Categorical`` (hashed once; counting, duplicates and ids then work on
    integer codes)."""
    pl = _pl()
    lf = table.lazy() if table is not None else pl.scan_parquet(job.files).select(job.columns())
    dtypes = lf.collect_schema()
    seg, user = job.seg, pl.col(job.user)
    if seg.segment_column:
        lf = lf.filter(pl.col(seg.segment_column).is_in(seg.segment_values))
    us, local = _polars_time(dtypes[seg.time_column], job, timezone)
    ok = user.is_not_null() & (user != "") if dtypes[job.user] == pl.String else user.is_not_null()
    lf = (lf.with_columns(us.alias("_us")).with_columns((pl.col("_us") // 1_000_000).alias("_t"))
          .filter(ok & pl.col("_t").is_between(job.start, job.end - 1)))
    if job.needs_local:
        lf = lf.with_columns(local.alias("_local"))
    keys = [_polars_key(c, dtypes[c]) for c in _bucket_only(job)]
    values = []
    for a in job.attrs:
        v = _polars_value(a, dtypes.get(a.column))
        if categorical and dtypes.get(a.column) == pl.String:
            v = v.cast(pl.Categorical)
        values.append(v.alias(f"_v_{a.name}"))
    return lf.select(job.user, "_us", "_t", *(["_local"] if job.needs_local else []), *values, *keys
                     ).collect(engine=engine)


def polars_pipeline(schema: SchemaConfig, out: Path, engine: str = "streaming", shared_read: bool = False,
                    categorical: bool = True) -> dict[str, int]:
    """Every segment's words to ``out/<segment>.parquet``; returns the words per segment.

    ``shared_read``: segments routed out of one table read it once (its columns for all of them);
    otherwise each segment scans it with its own filter and projection."""
    pl = _pl()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[tuple, Any] = {}
    todo = jobs(schema)
    shared = {}
    for j in todo:
        shared.setdefault((tuple(j.files), j.seg.segment_column), []).append(j)
    words = {}
    for j in todo:
        table = None
        key = (tuple(j.files), j.seg.segment_column)
        if shared_read and j.seg.segment_column and len(shared[key]) > 1:
            if key not in tables:
                cols = list(dict.fromkeys(c for k in shared[key] for c in k.columns()))
                values = [v for k in shared[key] for v in k.seg.segment_values]
                tables[key] = (pl.scan_parquet(j.files).select(cols)
                               .filter(pl.col(j.seg.segment_column).is_in(values)).collect(engine=engine))
            table = tables[key]
        good = polars_good_rows(j, schema.data.timezone, table, engine, categorical)
        if table is not None and j is shared[key][-1]:
            del tables[key]
        df = polars_words(good, j, engine)
        del good
        df.write_parquet(out / f"{j.name}.parquet")
        words[j.name] = int(df["word_len"].list.len().sum())
    return words


# -- DuckDB -----------------------------------------------------------------------------------------------------
def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(v: Any) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v)


_ORD = "(file_index::BIGINT << 40) | file_row_number"  # input order (file, row) as one integer


def _duckdb_types(con, relation: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}


def _files(files: list[str]) -> str:
    return f"read_parquet([{', '.join(map(_lit, files))}])"


def duckdb_segment_sql(job: Job, timezone: str, types: dict[str, str], out: str, table: str | None = None) -> str:
    """One COPY statement: the segment's words to ``out`` (Parquet).  ``table``: read the rows from
    this table (with the input order in column ``_ord``) instead of the segment's files."""
    seg = job.seg
    u, tcol = _q(job.user), _q(seg.time_column)
    ttype = types[seg.time_column].upper()
    if ttype.startswith("TIMESTAMP"):
        us = f"epoch_us({tcol})"
        tstz = tcol if "TIME ZONE" in ttype else f"timezone('UTC', {tcol})"
    elif ttype in ("BIGINT", "INTEGER", "HUGEINT", "SMALLINT", "UBIGINT", "UINTEGER", "DOUBLE", "FLOAT"):
        v = f"{tcol}::BIGINT"
        us = f"({v} // 1000)" if seg.time_unit == "ns" else f"({v} * {_US[seg.time_unit]})"
        tstz = None
    else:
        raise NotImplementedError(f"time column of type {ttype}: the baselines read timestamps and epochs")
    # local wall-clock seconds (DST-correct: timezone() of a TIMESTAMPTZ is the local TIMESTAMP)
    local = f"epoch_us(timezone({_lit(timezone)}, {'make_timestamptz(us)' if tstz is None else '_ts'})) // 1000000"

    def is_float(c: str) -> bool:
        return types[c].upper() in ("DOUBLE", "FLOAT", "REAL")

    def value(a: AttributeSpec) -> str:
        if a.column == "@hour":
            return "(loc // 3600) % 24"
        if a.column == "@weekday":
            return "(loc // 86400 + 3) % 7"
        c = _q(a.column)
        if a.buckets is not None:
            x = f"{c}::DOUBLE"
            b = " + ".join(f"({x} >= {float(v)!r})::BIGINT" for v in a.buckets)
            return f"CASE WHEN {x} IS NULL OR isnan({x}) THEN NULL ELSE {b} END"
        if types[a.column].upper() == "BOOLEAN":
            return f"{c}::BIGINT"
        if is_float(a.column):
            return f"CASE WHEN isnan({c}) THEN NULL ELSE {c} + 0.0 END"
        return c

    where = [f"{u} IS NOT NULL", f"{us} >= {job.start * 1_000_000}", f"{us} < {job.end * 1_000_000}"]
    if types[job.user].upper() == "VARCHAR":
        where.append(f"{u} <> ''")
    if seg.segment_column:
        where.append(f"{_q(seg.segment_column)} IN ({', '.join(map(_lit, seg.segment_values))})")
    # the duplicate key: user, microsecond and each raw column (a plain attribute's value stands for it)
    plain = {a.column: f"v{i}" for i, a in reversed(list(enumerate(job.attrs))) if a.buckets is None}
    keys = [f"CASE WHEN isnan({_q(c)}) THEN NULL ELSE {_q(c)} + 0.0 END AS k{i}" if is_float(c) else f"{_q(c)} AS k{i}"
            for i, c in enumerate(job.raw) if c not in plain]
    k = len(job.attrs)
    values = [f"{value(a)} AS v{i}" for i, a in enumerate(job.attrs)]
    loc = "loc, " if job.needs_local else ""
    ctes = [
        # the input order breaks time ties and picks the first of repeated events
        f"src AS (SELECT {u} AS u, {us} AS us, {'_ord' if table else _ORD} AS ord"
        f"{'' if tstz is None else f', {tstz} AS _ts'}{''.join(', ' + _q(c) for c in job.raw)} "
        f"FROM {table or _files(job.files)} WHERE {' AND '.join(where)})",
        f"loc AS (SELECT *, {local} AS loc FROM src)",
        f"good AS (SELECT u, us, {loc}ord, {', '.join(values + keys)} FROM {'loc' if loc else 'src'})",
    ]
    if not loc:
        del ctes[1]
    # Vocabularies: every distinct value ranked by (count desc, value), the rank a dense code of
    # the value; the known values (a prefix of the ranks: count >= min_count, within max_vocab)
    # get id rank + 1, the rest 1.  One join per attribute gives both, so repeated events are
    # then found on integers (the codes) rather than on the strings.
    joins, codes, ids = [], [], []
    for i, a in enumerate(job.attrs):
        known = f"n >= {a.min_count}" + (f" AND r <= {a.max_vocab - 2}" if a.max_vocab is not None else "")
        ctes.append(
            f"voc{i} AS (SELECT v, r::INTEGER AS code, (CASE WHEN {known} THEN r + 1 ELSE 1 END)::INTEGER AS id "
            f"FROM (SELECT v, n, row_number() OVER (ORDER BY n DESC, v) AS r FROM "
            f"(SELECT v{i} AS v, count(*) AS n FROM good WHERE v{i} IS NOT NULL GROUP BY v{i})))")
        joins.append(f"LEFT JOIN voc{i} ON good.v{i} = voc{i}.v")
        codes.append(f"coalesce(voc{i}.code, 0) AS c{i}")
        ids.append(f"coalesce(voc{i}.id, 1) AS i{i}")
    bucket_keys = [f"k{i}" for i, c in enumerate(job.raw) if c not in plain]
    ctes.append(f"coded AS (SELECT u, us, {loc}ord, {', '.join(codes + ids + bucket_keys)} FROM good "
                f"{' '.join(joins)})")
    id_cols = ", ".join(f"i{i}" for i in range(k))
    if seg.drop_duplicates:  # one row per distinct event, at its first input position
        key = ", ".join(["u", "us", *(["loc"] if loc else []), *[f"c{i}" for i in range(k)], *bucket_keys, id_cols])
        ctes.append(f"dd AS (SELECT {key}, min(ord) AS ord FROM coded GROUP BY {key})")
    else:
        ctes.append("dd AS (SELECT * FROM coded)")
    ctes.append(f"ev AS (SELECT u, us // 1000000 AS t, {loc}ord, {id_cols} FROM dd)")
    by = "PARTITION BY u ORDER BY t, ord"
    if seg.word_rule == "daily":
        day = f"(loc - {seg.day_start_hour * 3600}) // 86400"
        new = f"coalesce({day} <> lag({day}) OVER ({by}), true)"
    else:
        new = f"coalesce(t - lag(t) OVER ({by}) > {seg.gap_minutes * 60!r}, true)"
    if seg.position_unit == "day":
        pos = f"((loc - {seg.day_start_hour * 3600}) // 86400 - {job.day0})"
    else:
        pos = f"((t - {job.start}) // 3600)"
    cap = seg.max_actions_per_word
    ctes += [
        # gaps and islands: a word starts where `new` is, its number is the running count of starts
        f"fl AS (SELECT *, {new}::INTEGER AS new FROM ev)",
        f"wn AS (SELECT *, sum(new) OVER (w ROWS UNBOUNDED PRECEDING) AS w, "
        f"sum(new) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS n_words, "
        f"row_number() OVER w AS rn FROM fl WINDOW w AS ({by}))",
        # the last max_words words; positions grow with time, so a word's (its first event's) is its smallest
        f"words AS (SELECT u, w, min({pos})::INTEGER AS pos, least(count(*), {cap})::INTEGER AS len, "
        f"list([{', '.join(f'i{i}' for i in range(k))}] ORDER BY rn)[-{cap}:] AS acts FROM wn "
        f"WHERE w > n_words - {seg.max_words} GROUP BY u, w)",
        "users AS (SELECT u, list(pos ORDER BY w) AS word_pos, list(len ORDER BY w) AS word_len, "
        "flatten(list(acts ORDER BY w)) AS acts FROM words GROUP BY u)",
    ]
    cols = ", ".join(f"list_transform(acts, lambda x: x[{i + 1}]) AS {_q(_id_name(a))}"
                     for i, a in enumerate(job.attrs))
    query = f"WITH {', '.join(ctes)} SELECT u AS {u}, word_pos, word_len, {cols} FROM users"
    return f"COPY ({query}) TO {_lit(out)} (FORMAT parquet)"


def duckdb_pipeline(schema: SchemaConfig, out: Path, threads: int | None = 2, memory_limit: str | None = None,
                    temp_dir: str | None = None, shared_read: bool = False) -> dict[str, int]:
    """Every segment's words to ``out/<segment>.parquet`` by one SQL statement each.

    ``shared_read``: segments routed out of one table load it once into a temporary table (the
    columns they read); otherwise each statement scans the files (filters pushed into the scan)."""
    import duckdb

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    if threads:
        con.execute(f"PRAGMA threads={int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {_lit(memory_limit)}")
    con.execute(f"SET temp_directory = {_lit(temp_dir or str(out / '.duckdb_tmp'))}")
    con.execute("SET preserve_insertion_order = false")  # no output order needed: users are keyed
    words = {}
    todo = jobs(schema)
    groups: dict[tuple, list[Job]] = {}
    for j in todo:
        groups.setdefault((tuple(j.files), j.seg.segment_column), []).append(j)
    loaded: dict[tuple, str] = {}
    for j in todo:
        path = str(out / f"{j.name}.parquet")
        key = (tuple(j.files), j.seg.segment_column)
        table = None
        if shared_read and j.seg.segment_column and len(groups[key]) > 1:
            if key not in loaded:
                loaded[key] = table = f"t{len(loaded)}"
                cols = ", ".join(_q(c) for c in dict.fromkeys(c for k in groups[key] for c in k.columns()))
                values = ", ".join(_lit(v) for k in groups[key] for v in k.seg.segment_values)
                con.execute(f"CREATE TEMP TABLE {table} AS SELECT {cols}, {_ORD} AS _ord FROM {_files(j.files)} "
                            f"WHERE {_q(j.seg.segment_column)} IN ({values})")
            table = loaded[key]
        types = _duckdb_types(con, table or _files(j.files))
        con.execute(duckdb_segment_sql(j, schema.data.timezone, types, path, table))
        if table and j is groups[key][-1]:
            con.execute(f"DROP TABLE {table}")
        words[j.name] = con.execute(f"SELECT coalesce(sum(len(word_len)), 0) FROM read_parquet({_lit(path)})"
                                    ).fetchone()[0]
    con.close()
    return {k: int(v) for k, v in words.items()}


# -- pandas -----------------------------------------------------------------------------------------------------
def pandas_segment(job: Job, timezone: str):
    import numpy as np
    import pandas as pd

    seg, user = job.seg, job.user
    df = pd.concat([pd.read_parquet(f, columns=job.columns()) for f in job.files], ignore_index=True)
    if seg.segment_column:
        df = df[df[seg.segment_column].isin(seg.segment_values)]
    t = df[seg.time_column]
    if not isinstance(t.dtype, pd.DatetimeTZDtype) and pd.api.types.is_datetime64_any_dtype(t):
        t = t.dt.tz_localize("UTC")
    elif pd.api.types.is_numeric_dtype(t):
        t = pd.to_datetime(t.astype("int64"), unit=seg.time_unit, utc=True)
    df["_us"] = (t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    df["_t"] = df["_us"] // 1_000_000
    ok = df[user].notna() & (df["_t"] >= job.start) & (df["_t"] < job.end)
    if df[user].dtype == object or pd.api.types.is_string_dtype(df[user]):
        ok &= df[user] != ""
    df = df[ok].copy()
    local = t[ok.to_numpy()].dt.tz_convert(timezone).dt.tz_localize(None)
    df["_local"] = ((local - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).to_numpy()
    values = {}
    for a in job.attrs:
        if a.column == "@hour":
            v = (df["_local"] // 3600) % 24
        elif a.column == "@weekday":
            v = (df["_local"] // 86400 + 3) % 7
        elif a.buckets is not None:
            x = df[a.column].to_numpy(float)
            v = pd.Series(np.searchsorted(np.asarray(a.buckets, float), x, side="right"),
                          index=df.index).where(~np.isnan(x))
        else:
            v = df[a.column]
        counts = v.value_counts()  # over the good rows: duplicates count (FORMATS.md §3)
        counts = counts[counts >= a.min_count]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if a.max_vocab is not None:
            ranked = ranked[: max(0, a.max_vocab - 2)]
        lookup = {value: i + 2 for i, (value, _) in enumerate(ranked)}
        values[_id_name(a)] = v.map(lookup).fillna(1).astype(np.int32)
    for c, v in values.items():
        df[c] = v
    ids = list(values)
    if seg.drop_duplicates:
        df = df.drop_duplicates(subset=[user, "_us", *job.raw], keep="first")
    df = df.sort_values([user, "_t"], kind="stable")
    first_of_user = df[user].ne(df[user].shift())
    if seg.word_rule == "daily":
        key = (df["_local"] - seg.day_start_hour * 3600) // 86400
        new = key.ne(key.shift())
    else:
        new = df["_t"].diff() > seg.gap_minutes * 60
    df["_w"] = (new | first_of_user).cumsum()
    if seg.position_unit == "day":
        df["_pos"] = (df["_local"] - seg.day_start_hour * 3600) // 86400 - job.day0
    else:
        df["_pos"] = (df["_t"] - job.start) // 3600
    df["_wpos"] = df.groupby("_w")["_pos"].transform("first")
    df = df[df.groupby(user)["_w"].transform("max") - df["_w"] < seg.max_words]
    df = df[df.groupby("_w").cumcount(ascending=False) < seg.max_actions_per_word]
    per_word = df.groupby("_w", sort=False).agg(user=(user, "first"), word_pos=("_wpos", "first"),
                                                word_len=(user, "size"))
    per_user = per_word.groupby("user", sort=False).agg(word_pos=("word_pos", list), word_len=("word_len", list))
    for c in ids:
        per_user[c] = df.groupby(user, sort=False)[c].agg(list)
    return per_user.reset_index().rename(columns={"user": user})


def pandas_pipeline(schema: SchemaConfig, out: Path) -> dict[str, int]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = {}
    for j in jobs(schema):
        df = pandas_segment(j, schema.data.timezone)
        df.to_parquet(out / f"{j.name}.parquet")
        words[j.name] = int(df["word_len"].map(len).sum())
    return words


# -- as a command -----------------------------------------------------------------------------------------------
def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    from tokenizer.schema import load_schema

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tool", choices=["polars", "duckdb", "pandas"])
    p.add_argument("--schema", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--engine", default="streaming", help="polars: streaming (Polars 2's default) | in-memory")
    p.add_argument("--no-categorical", action="store_true", help="polars: string values as strings, not Categorical")
    p.add_argument("--threads", type=int, default=2, help="duckdb: PRAGMA threads")
    p.add_argument("--memory-limit", default="12GB", help="duckdb: memory_limit (spills to disk beyond it)")
    p.add_argument("--shared-read", action="store_true",
                   help="read a table shared by segments once (polars: into memory; duckdb: a temp table)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    schema = load_schema(args.schema)
    if args.tool == "polars":
        words = polars_pipeline(schema, Path(args.out), engine=args.engine, shared_read=args.shared_read,
                                categorical=not args.no_categorical)
    elif args.tool == "duckdb":
        words = duckdb_pipeline(schema, Path(args.out), threads=args.threads, memory_limit=args.memory_limit,
                                shared_read=args.shared_read)
    else:
        words = pandas_pipeline(schema, Path(args.out))
    print(json.dumps({"tool": args.tool, "words": words, "seconds": round(time.perf_counter() - t0, 3),
                      "peak_rss": _peak_rss(), "polars_max_threads": os.environ.get("POLARS_MAX_THREADS")}))


if __name__ == "__main__":
    main()
