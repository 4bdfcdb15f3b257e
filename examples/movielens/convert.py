"""MovieLens-100K (``ml-100k/``: u.data, u.item, u.user) -> userbert-engine's canonical input and labels.

MovieLens' licence forbids redistribution: download ml-100k yourself from GroupLens
(https://grouplens.org/datasets/movielens/100k/), then

    python examples/movielens/convert.py --ml100k path/to/ml-100k --out ml
    userbert-engine tokenize --schema ml/schema.toml --out ml/tok
    userbert-engine pretrain --data ml/tok --out ml/run --config configs/demo.toml
    userbert-engine finetune --data ml/tok --labels ml/labels/gender.parquet --task binary --init ml/run --out ml/ft

Mapping: one behaviour segment, ``ratings``, one word per day (04:00 to 04:00, UTC); per rating
the attributes item (movie id), genre (the movie's first listed genre), rating (1-5), decade
(of the release date) and hour.  User attribute: age (bucketed).  Gender and occupation are
labels, so they are not user attributes (an input must not hold its own label).

Labels (ratings before ``--cut`` are the input; after it, the next-genre labels):

- ``labels/gender.parquet``: 1 for F (binary)
- ``labels/occupation.parquet``: the occupation (multiclass, 21 classes)
- ``labels/next_genre.parquet``: distinct first genres of the movies a user rated after the cut (next)

Formats (ml-100k README): u.data is tab-separated ``user item rating unix_time``; u.item is
``|``-separated ``id|title|release date|video release date|IMDb URL|19 genre flags`` in latin-1;
u.user is ``id|age|gender|occupation|zip``.  Needs pyarrow only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
AGE_BUCKETS = [18, 25, 35, 45, 50, 56]
DEFAULT_CUT = "1998-03-01"

SCHEMA = """\
# MovieLens-100K, written by examples/movielens/convert.py (the data itself is not redistributable).
[data]
users = "users.parquet"
window_start = "{start}"
window_end = "{end}"
timezone = "UTC"

[segments.ratings]
path = "ratings"
time_column = "ts"
time_unit = "s"
word_rule = "daily"
day_start_hour = 4
position_unit = "day"
max_words = 128
max_actions_per_word = 64
attributes = [
  {{ name = "item",   column = "item",   dim = 32, min_count = 2 }},
  {{ name = "genre",  column = "genre",  dim = 16 }},
  {{ name = "rating", column = "rating", dim = 4 }},
  {{ name = "decade", column = "decade", dim = 4 }},
  {{ name = "hour",   column = "@hour",  dim = 8 }},
]

[[user_attributes]]
name = "age"
buckets = {age_buckets}
"""


class MovieLensFormatError(ValueError):
    """A file does not look like the ml-100k format; the message names the file and line."""


def _lines(path: Path, encoding: str = "latin-1") -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected the ml-100k files u.data, u.item, u.user)")
    return [line for line in path.read_text(encoding=encoding).splitlines() if line.strip()]


def read_ratings(path: Path) -> pa.Table:
    users, items, ratings, times = [], [], [], []
    for i, line in enumerate(_lines(path), 1):
        parts = line.split("\t")
        if len(parts) != 4:
            raise MovieLensFormatError(f"{path}:{i}: expected 4 tab-separated fields (user item rating time), "
                                       f"got {len(parts)}: {line[:60]!r}")
        try:
            u, m, r, t = (int(p) for p in parts)
        except ValueError:
            raise MovieLensFormatError(f"{path}:{i}: expected integers, got {line[:60]!r}") from None
        users.append(u)
        items.append(m)
        ratings.append(r)
        times.append(t)
    return pa.table({"user_id": pa.array(users, pa.int64()), "item": pa.array(items, pa.int64()),
                     "rating": pa.array(ratings, pa.int64()), "ts": pa.array(times, pa.int64())})


def read_items(path: Path) -> dict[int, tuple[str, str | None]]:
    """movie id -> (first genre, decade of release or None)."""
    out = {}
    for i, line in enumerate(_lines(path), 1):
        parts = line.split("|")
        if len(parts) != 5 + len(GENRES):
            raise MovieLensFormatError(f"{path}:{i}: expected {5 + len(GENRES)} '|'-separated fields, "
                                       f"got {len(parts)}")
        flags = parts[5:]
        genre = next((g for g, f in zip(GENRES, flags) if f.strip() == "1"), "unknown")
        decade = None
        if parts[2].strip():
            try:
                year = dt.datetime.strptime(parts[2].strip(), "%d-%b-%Y").year
                decade = f"{year // 10 * 10}s"
            except ValueError:
                raise MovieLensFormatError(f"{path}:{i}: release date {parts[2]!r} is not like 01-Jan-1995") from None
        out[int(parts[0])] = (genre, decade)
    return out


def read_users(path: Path) -> pa.Table:
    ids, ages, genders, occupations = [], [], [], []
    for i, line in enumerate(_lines(path), 1):
        parts = line.split("|")
        if len(parts) != 5:
            raise MovieLensFormatError(f"{path}:{i}: expected 5 '|'-separated fields (id|age|gender|occupation|zip)")
        if parts[2] not in ("M", "F"):
            raise MovieLensFormatError(f"{path}:{i}: gender {parts[2]!r} is not M or F")
        ids.append(int(parts[0]))
        ages.append(int(parts[1]))
        genders.append(parts[2])
        occupations.append(parts[3])
    return pa.table({"user_id": pa.array(ids, pa.int64()), "age": pa.array(ages, pa.int64()),
                     "gender": genders, "occupation": occupations})


def convert(ml_dir: str | Path, out_dir: str | Path, cut: str = DEFAULT_CUT) -> dict:
    """Write DIR/{ratings/, users.parquet, labels/, schema.toml, CONVERT.json}; returns the counts."""
    ml, out = Path(ml_dir), Path(out_dir)
    ratings = read_ratings(ml / "u.data")
    items = read_items(ml / "u.item")
    users = read_users(ml / "u.user")
    unknown = sorted(set(pc.unique(ratings["item"]).to_pylist()) - set(items))
    if unknown:
        raise MovieLensFormatError(f"{ml / 'u.data'}: items {unknown[:5]} are not in {ml / 'u.item'}")
    item_ids = ratings["item"].to_numpy()
    genre = pa.array([items[m][0] for m in item_ids.tolist()])
    decade = pa.array([items[m][1] for m in item_ids.tolist()], pa.string())
    events = pa.table({"user_id": ratings["user_id"], "ts": ratings["ts"], "item": ratings["item"], "genre": genre,
                       "rating": ratings["rating"], "decade": decade})
    cut_s = int(dt.datetime.fromisoformat(cut).replace(tzinfo=dt.UTC).timestamp())
    ts = events["ts"].to_numpy()
    start = dt.datetime.fromtimestamp(int(ts.min()), dt.UTC).replace(hour=0, minute=0, second=0)
    history, future = events.filter(pa.array(ts < cut_s)), events.filter(pa.array(ts >= cut_s))
    (out / "ratings").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    pq.write_table(history, out / "ratings" / "part-00000.parquet")
    pq.write_table(users.select(["user_id", "age"]), out / "users.parquet")
    seen = pc.unique(history["user_id"])
    known = users.filter(pc.is_in(users["user_id"], value_set=seen))
    female = pc.equal(known["gender"], "F").cast(pa.int8())
    pq.write_table(pa.table({"user_id": known["user_id"], "label": female}), out / "labels" / "gender.parquet")
    pq.write_table(pa.table({"user_id": known["user_id"], "label": known["occupation"]}),
                   out / "labels" / "occupation.parquet")
    fut = future.filter(pc.is_in(future["user_id"], value_set=seen))
    grouped = fut.group_by("user_id").aggregate([("genre", "distinct")]).sort_by("user_id")
    pq.write_table(pa.table({"user_id": grouped["user_id"], "label": grouped["genre_distinct"]}),
                   out / "labels" / "next_genre.parquet")
    (out / "schema.toml").write_text(SCHEMA.format(start=start.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   end=dt.datetime.fromisoformat(cut).strftime("%Y-%m-%dT%H:%M:%S"),
                                                   age_buckets=AGE_BUCKETS))
    counts = {"cut": cut, "ratings_before_cut": history.num_rows, "ratings_after_cut": future.num_rows,
              "users_with_history": len(seen), "next_genre_users": grouped.num_rows,
              "female_share": round(float(np.mean(pc.equal(known["gender"], "F").to_numpy(zero_copy_only=False))), 4)
              if known.num_rows else None}
    (out / "CONVERT.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ml100k", type=Path, required=True, help="the unpacked ml-100k directory (u.data, u.item, u.user)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cut", default=DEFAULT_CUT, help="ratings before it are the input; after it, next-genre labels")
    args = p.parse_args(argv)
    print(json.dumps(convert(args.ml100k, args.out, args.cut), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
