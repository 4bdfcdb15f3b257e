"""MovieLens-100K -> userbert-engine's canonical input and labels, from GroupLens' or RecBole's files.

MovieLens' licence forbids redistribution: nothing of it is in this repository.  Two layouts are read:

- **GroupLens** (https://grouplens.org/datasets/movielens/100k/): the unpacked ``ml-100k/`` directory
  (u.data, u.item, u.user) or ``ml-100k.zip`` itself;
- **RecBole's atomic files** (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``), as shipped in the
  RecBole wheel: ``pip download recbole==1.2.1 --no-deps`` and pass the ``.whl`` itself, or the
  directory ``recbole/dataset_example/ml-100k`` unpacked from it.

    python examples/movielens/convert.py --ml100k path/to/ml-100k --out ml     # or the .zip / .whl
    userbert-engine tokenize --schema ml/schema.toml --out ml/tok
    userbert-engine pretrain --data ml/tok --out ml/run --config examples/configs/movielens.toml
    userbert-engine finetune --data ml/tok --labels ml/labels/gender.parquet --task binary --init ml/run --out ml/ft

Mapping: one behaviour segment, ``ratings``, one word per day (04:00 to 04:00, UTC), a day of more
than 32 ratings split into several words (``word_overflow = "split"``: raters rate in bursts, and the
paper's cap would drop a third of the ratings); per rating the attributes item (movie id), genre
(the movie's first listed genre), rating (1-5), decade (of the release date) and hour.  User
attribute: age (bucketed).  Gender and occupation are labels, so they are not user attributes (an
input must not hold its own label).

Labels (ratings before ``--cut`` are the input; after it, the next-genre and next-movie labels):

- ``labels/gender.parquet``: 1 for F (binary)
- ``labels/occupation.parquet``: the occupation (multiclass, 21 classes)
- ``labels/next_genre.parquet``: distinct first genres of the movies a user rated after the cut (next)
- ``labels/next_movie.parquet``: distinct movies a user rated after the cut (next, over ``ratings.item``)

Formats: u.data is tab-separated ``user item rating unix_time``; u.item is ``|``-separated
``id|title|release date|video release date|IMDb URL|19 genre flags`` in latin-1; u.user is
``id|age|gender|occupation|zip``.  RecBole's atomic files are tab-separated with a ``name:type``
header line; ml-100k.item holds ``item_id, movie_title, release_year, class`` (the genres, space
separated, in u.item's flag order).  Both layouts give the same tables.  Needs pyarrow only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import zipfile
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
max_actions_per_word = 32
word_overflow = "split"
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


# -- RecBole's atomic files ---------------------------------------------------------------------------
RECBOLE_FILES = {"inter": "ml-100k.inter", "item": "ml-100k.item", "user": "ml-100k.user"}
_RECBOLE_HEADERS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "item": ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"],
    "user": ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
}


def _atomic(path: Path, kind: str) -> list[list[str]]:
    """Rows of a RecBole atomic file, its header checked against ml-100k's."""
    lines = _lines(path, "utf-8")
    header = lines[0].split("\t") if lines else []
    if header != _RECBOLE_HEADERS[kind]:
        raise MovieLensFormatError(f"{path}:1: expected the header {chr(9).join(_RECBOLE_HEADERS[kind])!r}, "
                                   f"got {lines[0][:80]!r}" if lines else f"{path}: empty file")
    rows = []
    for i, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) != len(header):
            raise MovieLensFormatError(f"{path}:{i}: expected {len(header)} tab-separated fields, got {len(parts)}")
        rows.append(parts)
    return rows


def _integral(path: Path, line: int, text: str, what: str) -> int:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if v != v or v != int(v):
        raise MovieLensFormatError(f"{path}:{line}: {what} {text!r} is not an integer")
    return int(v)


def read_recbole_ratings(path: Path) -> pa.Table:
    rows = _atomic(path, "inter")
    cols = [[_integral(path, i, r[k], name) for i, r in enumerate(rows, 2)]
            for k, name in enumerate(("user id", "item id", "rating", "timestamp"))]
    return pa.table({"user_id": pa.array(cols[0], pa.int64()), "item": pa.array(cols[1], pa.int64()),
                     "rating": pa.array(cols[2], pa.int64()), "ts": pa.array(cols[3], pa.int64())})


def read_recbole_items(path: Path, odd: list[str] | None = None) -> dict[int, tuple[str, str | None]]:
    """movie id -> (first genre, decade or None).  RecBole's conversion writes "unkonwn" (sic) for an
    unknown year and, for a few titles that end in "(V)", the "V" as the year: such years are unknown,
    and each is noted in ``odd`` (CONVERT.json lists them) rather than dropped silently."""
    out = {}
    for i, (item, _title, year, classes) in enumerate(_atomic(path, "item"), 2):
        genres = classes.split()
        bad = [g for g in genres if g not in GENRES]
        if bad:
            raise MovieLensFormatError(f"{path}:{i}: unknown genre {bad[0]!r} (known: {', '.join(GENRES)})")
        year = year.strip()
        decade = f"{int(year) // 10 * 10}s" if year.isdigit() else None
        if decade is None and year not in ("", "unknown", "unkonwn") and odd is not None:
            odd.append(f"{path.name}:{i}: release year {year!r} read as unknown")
        out[_integral(path, i, item, "item id")] = (genres[0] if genres else "unknown", decade)
    return out


def read_recbole_users(path: Path) -> pa.Table:
    rows = _atomic(path, "user")
    for i, r in enumerate(rows, 2):
        if r[2] not in ("M", "F"):
            raise MovieLensFormatError(f"{path}:{i}: gender {r[2]!r} is not M or F")
    return pa.table({"user_id": pa.array([_integral(path, i, r[0], "user id") for i, r in enumerate(rows, 2)],
                                         pa.int64()),
                     "age": pa.array([_integral(path, i, r[1], "age") for i, r in enumerate(rows, 2)], pa.int64()),
                     "gender": [r[2] for r in rows], "occupation": [r[3] for r in rows]})


# -- either layout -------------------------------------------------------------------------------------
def _unpack(archive: Path, into: Path) -> Path:
    """The ml-100k files of a GroupLens zip or the RecBole wheel, extracted into ``into``."""
    wanted = {"u.data", "u.item", "u.user", *RECBOLE_FILES.values()}
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        found = [n for n in z.namelist() if Path(n).name in wanted and "ml-100k" in n]
        if not found:
            raise FileNotFoundError(f"{archive}: holds no ml-100k files (expected GroupLens' ml-100k.zip or "
                                    "the RecBole wheel)")
        for n in found:
            (into / Path(n).name).write_bytes(z.read(n))
    return into


def read_ml100k(source: str | Path, scratch: Path | None = None,
                odd: list[str] | None = None) -> tuple[pa.Table, dict, pa.Table, str]:
    """(ratings, items, users, layout) from a GroupLens or RecBole directory, zip or wheel; values read
    as unknown are noted in ``odd``."""
    ml = Path(source)
    if ml.is_file() and zipfile.is_zipfile(ml):
        ml = _unpack(ml, scratch if scratch is not None else ml.with_suffix(".files"))
    if (ml / "u.data").is_file():
        return read_ratings(ml / "u.data"), read_items(ml / "u.item"), read_users(ml / "u.user"), "grouplens"
    if (ml / RECBOLE_FILES["inter"]).is_file():
        return (read_recbole_ratings(ml / RECBOLE_FILES["inter"]), read_recbole_items(ml / RECBOLE_FILES["item"], odd),
                read_recbole_users(ml / RECBOLE_FILES["user"]), "recbole")
    raise FileNotFoundError(f"{ml}: not found, or holds neither u.data (GroupLens' ml-100k) nor "
                            f"{RECBOLE_FILES['inter']} (RecBole's atomic files)")


def convert(ml_dir: str | Path, out_dir: str | Path, cut: str = DEFAULT_CUT) -> dict:
    """Write DIR/{ratings/, users.parquet, labels/, schema.toml, CONVERT.json}; returns the counts.
    ``ml_dir``: a GroupLens or RecBole directory, GroupLens' zip or the RecBole wheel."""
    out = Path(out_dir)
    odd: list[str] = []
    ratings, items, users, layout = read_ml100k(ml_dir, out / "_source", odd)
    unknown = sorted(set(pc.unique(ratings["item"]).to_pylist()) - set(items))
    if unknown:
        raise MovieLensFormatError(f"{ml_dir}: rated items {unknown[:5]} are not in the item file")
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
    movies = fut.group_by("user_id").aggregate([("item", "distinct")]).sort_by("user_id")
    pq.write_table(pa.table({"user_id": movies["user_id"], "label": movies["item_distinct"]}),
                   out / "labels" / "next_movie.parquet")
    (out / "schema.toml").write_text(SCHEMA.format(start=start.strftime("%Y-%m-%dT%H:%M:%S"),
                                                   end=dt.datetime.fromisoformat(cut).strftime("%Y-%m-%dT%H:%M:%S"),
                                                   age_buckets=AGE_BUCKETS))
    counts = {"layout": layout, "cut": cut, "ratings_before_cut": history.num_rows,
              "ratings_after_cut": future.num_rows,
              "users_with_history": len(seen), "next_genre_users": grouped.num_rows,
              "next_movie_users": movies.num_rows, "read_as_unknown": odd,
              "female_share": round(float(np.mean(pc.equal(known["gender"], "F").to_numpy(zero_copy_only=False))), 4)
              if known.num_rows else None}
    (out / "CONVERT.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ml100k", type=Path, required=True,
                   help="GroupLens' ml-100k directory or zip, or RecBole's atomic files (directory or the wheel)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cut", default=DEFAULT_CUT, help="ratings before it are the input; after it, next-genre labels")
    args = p.parse_args(argv)
    print(json.dumps(convert(args.ml100k, args.out, args.cut), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
