"""The baselines of the tokenizer benchmark: the same words computed the way a user would write
them, with Polars (lazy scan, sort, window expressions, group_by) and with pandas.

Both follow docs/FORMATS.md §2-3 for any schema: drop bad rows and duplicates, count the
vocabularies (min_count, max_vocab, ties by value), sort by (user, time) stably, cut daily or
session words, keep the last max_words words and the last max_actions_per_word actions, and
write one Parquet file per segment with a row per user holding the word positions, lengths and
attribute ids.  The test here checks that they produce exactly the tokenizer's words, so the
benchmark compares equal work.  (User attributes are left out of both baselines: they are a
small table.)
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

from tokenizer.io import resolve_inputs
from tokenizer.schema import DERIVED_COLUMNS, SchemaConfig, SegmentSpec


def _window(schema: SchemaConfig, seg: SegmentSpec) -> tuple[int, int, int]:
    """(start, end) UTC seconds and the window's first daily key (local days since the epoch)."""
    start, end = schema.window_seconds(seg)
    tz = zoneinfo.ZoneInfo(schema.data.timezone)
    offset = int(dt.datetime.fromtimestamp(start, tz).utcoffset().total_seconds())
    return start, end, (start + offset - seg.day_start_hour * 3600) // 86400


# -- Polars ---------------------------------------------------------------------------------------------
def polars_segment(schema: SchemaConfig, seg: SegmentSpec) -> pl.DataFrame:
    user = seg.user_column or schema.data.user_column
    files = [str(f) for f in resolve_inputs(schema.resolve(seg.path))]
    start, end, day0 = _window(schema, seg)
    read = [a.column for a in seg.attributes if a.column not in DERIVED_COLUMNS]
    lf = (
        pl.scan_parquet(files)
        .select([user, seg.time_column, *dict.fromkeys(read)])
        .with_columns(pl.col(seg.time_column).dt.epoch("us").alias("_us"))
        .with_columns((pl.col("_us") // 1_000_000).alias("_t"))
        .filter(pl.col(user).is_not_null() & pl.col("_t").is_between(start, end - 1))
        .unique(subset=[user, "_us", *read], keep="first", maintain_order=True)
        .with_columns(
            pl.col(seg.time_column).dt.convert_time_zone(schema.data.timezone).dt.replace_time_zone(None)
            .dt.epoch("s").alias("_local")
        )
    )
    attrs = []
    for a in seg.attributes:
        name = f"_a_{a.name}"
        if a.column == "@hour":
            expr = (pl.col("_local") // 3600) % 24
        elif a.column == "@weekday":
            expr = (pl.col("_local") // 86400 + 3) % 7
        elif a.buckets is not None:
            expr = pl.sum_horizontal([(pl.col(a.column) >= b).cast(pl.Int64) for b in a.buckets])
            expr = pl.when(pl.col(a.column).is_null() | pl.col(a.column).is_nan()).then(None).otherwise(expr)
        else:
            expr = pl.col(a.column)
        attrs.append(name)
        lf = lf.with_columns(expr.alias(name))
    df = lf.collect()
    # Vocabularies: counts, cutoffs, ids by (count desc, value asc), joined back (unknown = 1).
    for a, name in zip(seg.attributes, attrs):
        vc = df.group_by(name).len().drop_nulls(name).filter(pl.col("len") >= a.min_count)
        vc = vc.sort(["len", name], descending=[True, False])
        if a.max_vocab is not None:
            vc = vc.head(max(0, a.max_vocab - 2))
        vc = vc.with_row_index("_id", offset=2).select(name, pl.col("_id").cast(pl.Int32).alias(f"{name}_id"))
        df = df.join(vc, on=name, how="left", maintain_order="left").with_columns(pl.col(f"{name}_id").fill_null(1))
    ids = [f"{n}_id" for n in attrs]
    if seg.word_rule == "daily":
        key = (pl.col("_local") - seg.day_start_hour * 3600) // 86400
        new = key != key.shift()
    else:
        new = pl.col("_t").diff() > seg.gap_minutes * 60
    if seg.position_unit == "day":
        pos = (pl.col("_local") - seg.day_start_hour * 3600) // 86400 - day0
    else:
        pos = (pl.col("_t") - start) // 3600
    words = (
        df.sort([user, "_t"], maintain_order=True)
        .with_columns((new | (pl.col(user) != pl.col(user).shift())).fill_null(True).cum_sum().alias("_w"),
                      pos.alias("_pos"))
        # truncation: keep the last max_words words of each user; the cap: the last actions of a word
        .with_columns((pl.col("_w").max().over(user) - pl.col("_w")).alias("_from_end"),
                      pl.col("_pos").first().over("_w").alias("_wpos"))
        .filter(pl.col("_from_end") < seg.max_words)
        .with_columns(pl.int_range(pl.len()).reverse().over("_w").alias("_a_from_end"))
        .filter(pl.col("_a_from_end") < seg.max_actions_per_word)
    )
    per_word = words.group_by("_w", maintain_order=True).agg(
        pl.col(user).first(), pl.col("_wpos").first().cast(pl.Int32), pl.len().cast(pl.Int32).alias("_len"),
        *[pl.col(c) for c in ids],
    )
    return per_word.group_by(user, maintain_order=True).agg(
        pl.col("_wpos").alias("word_pos"), pl.col("_len").alias("word_len"),
        *[pl.col(c).list.explode(keep_nulls=False, empty_as_null=False).alias(c) for c in ids],
    )


def polars_pipeline(schema: SchemaConfig, out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    words = {}
    for name, seg in schema.segments.items():
        df = polars_segment(schema, seg)
        df.write_parquet(out / f"{name}.parquet")
        words[name] = int(df["word_len"].list.len().sum())
    return words


# -- pandas ---------------------------------------------------------------------------------------------
def pandas_segment(schema: SchemaConfig, seg: SegmentSpec) -> pd.DataFrame:
    user = seg.user_column or schema.data.user_column
    files = resolve_inputs(schema.resolve(seg.path))
    start, end, day0 = _window(schema, seg)
    read = list(dict.fromkeys(a.column for a in seg.attributes if a.column not in DERIVED_COLUMNS))
    df = pd.concat([pd.read_parquet(f, columns=[user, seg.time_column, *read]) for f in files], ignore_index=True)
    df["_us"] = (df[seg.time_column] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    df["_t"] = df["_us"] // 1_000_000
    df = df[df[user].notna() & (df["_t"] >= start) & (df["_t"] < end)]
    df = df.drop_duplicates(subset=[user, "_us", *read], keep="first")
    local = df[seg.time_column].dt.tz_convert(schema.data.timezone).dt.tz_localize(None)
    df["_local"] = (local - pd.Timestamp(0)) // pd.Timedelta(seconds=1)
    ids = []
    for a in seg.attributes:
        if a.column == "@hour":
            v = (df["_local"] // 3600) % 24
        elif a.column == "@weekday":
            v = (df["_local"] // 86400 + 3) % 7
        elif a.buckets is not None:
            v = pd.Series(np.searchsorted(np.asarray(a.buckets, float), df[a.column].to_numpy(float), side="right"),
                          index=df.index).where(df[a.column].notna())
        else:
            v = df[a.column]
        counts = v.value_counts()
        counts = counts[counts >= a.min_count]
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if a.max_vocab is not None:
            ranked = ranked[: max(0, a.max_vocab - 2)]
        lookup = {value: i + 2 for i, (value, _) in enumerate(ranked)}
        df[f"_id_{a.name}"] = v.map(lookup).fillna(1).astype(np.int32)
        ids.append(f"_id_{a.name}")
    df = df.sort_values([user, "_t"], kind="stable")
    first_of_user = df[user].ne(df[user].shift())
    if seg.word_rule == "daily":
        key = (df["_local"] - seg.day_start_hour * 3600) // 86400
        new = key.ne(key.shift())
    else:
        new = df["_t"].diff() > seg.gap_minutes * 60
    df["_w"] = (new | first_of_user).cumsum()
    if seg.position_unit == "day":
        df["_pos"] = (df["_local"] - seg.day_start_hour * 3600) // 86400 - day0
    else:
        df["_pos"] = (df["_t"] - start) // 3600
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
    out.mkdir(parents=True, exist_ok=True)
    words = {}
    for name, seg in schema.segments.items():
        df = pandas_segment(schema, seg)
        df.to_parquet(out / f"{name}.parquet")
        words[name] = int(df["word_len"].map(len).sum())
    return words


# -- equality with the tokenizer -------------------------------------------------------------------------------
def baseline_words(path: Path, user: str = "user_id") -> dict[Any, tuple]:
    """user -> (word positions, word lengths, the attribute id rows), from a baseline's Parquet."""
    t = pq.read_table(path).to_pydict()
    id_cols = [c for c in t if c not in (user, "word_pos", "word_len")]
    out = {}
    for i, u in enumerate(t[user]):
        rows = list(zip(*(t[c][i] for c in id_cols)))
        out[u] = (list(t["word_pos"][i]), list(t["word_len"][i]), rows)
    return out


def tokenizer_words(tokdir: Path, segment: str) -> dict[Any, tuple]:
    from tokenizer.shards import open_tokenized

    data = open_tokenized(tokdir)
    seg = data.segment(segment)
    out = {}
    for u, uid in enumerate(data.user_ids.to_pylist()):
        w0, w1 = seg.user_word_offsets[u], seg.user_word_offsets[u + 1]
        if w0 == w1:
            continue
        a0, a1 = seg.user_action_offsets[u], seg.user_action_offsets[u + 1]
        out[uid] = (seg.word_pos[w0:w1].tolist(), seg.word_len[w0:w1].tolist(),
                    [tuple(r) for r in seg.attr_ids[a0:a1].tolist()])
    return out


def test_baselines_compute_the_tokenizers_words(tmp_path):
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema
    from tokenizer.synthetic import generate

    generate(tmp_path / "raw", 300, seed=2, n_genres=40, n_shops=200, progress=False, event_order="shuffle")
    schema = load_schema(tmp_path / "raw" / "schema.toml")
    tokenize(schema, tmp_path / "tok", progress=False)
    polars_pipeline(schema, tmp_path / "pl")
    pandas_pipeline(schema, tmp_path / "pd")
    for name in schema.segments:
        expected = tokenizer_words(tmp_path / "tok", name)
        assert baseline_words(tmp_path / "pl" / f"{name}.parquet") == expected, f"polars, {name}"
        assert baseline_words(tmp_path / "pd" / f"{name}.parquet") == expected, f"pandas, {name}"
