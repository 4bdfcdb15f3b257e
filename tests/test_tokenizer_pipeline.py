"""End to end: raw files -> tokenize -> open_tokenized, checked against a pure-Python expectation.

The expectation is built from tokenizer/reference.py over plain Python rows (bad-row rules,
vocabularies, words), so the whole pipeline (readers, time normalisation, vocab, encoding,
sorting, Numba words, shard writing and reading) is compared with an independent restatement of
docs/FORMATS.md, on inputs that mix Parquet, CSV, CSV.gz and Arrow IPC in tiny batches.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io as pyio
import json
import zoneinfo
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from tokenizer import reference, shards
from tokenizer.io import InputError, read_table, resolve_inputs
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import ManifestError, open_tokenized


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    """Atomic renames without fsync: these tests need atomicity, not power-loss durability."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


TZ = "Europe/Berlin"
WINDOW = ("2026-03-20T00:00:00", "2026-04-05T00:00:00")  # crosses the 2026-03-29 DST switch


def utc(s: str, tz: str = TZ) -> int:
    return int(dt.datetime.fromisoformat(s).replace(tzinfo=zoneinfo.ZoneInfo(tz)).timestamp())


WS, WE = utc(WINDOW[0]), utc(WINDOW[1])

LONG = dict(
    path="long",
    word_rule="daily",
    position_unit="day",
    max_words=5,
    max_actions_per_word=3,
    attributes=[
        dict(name="action", dim=4),
        dict(name="shop", dim=8, min_count=3, max_vocab=12),
        dict(name="hour", column="@hour", dim=4),
    ],
)
SHORT = dict(
    path="short.parquet",
    word_rule="session",
    position_unit="hour",
    gap_minutes=30,
    max_words=7,
    max_actions_per_word=4,
    time_column="t_ms",
    time_unit="ms",
    user_column="uid",
    attributes=[
        dict(name="action", dim=4),
        dict(name="device", dim=2),
        dict(name="weekday", column="@weekday", dim=2),
    ],
)
USER_ATTRS = [dict(name="age", buckets=[18, 30, 50]), dict(name="gender", min_count=2)]


def schema_for(root: Path, long=LONG, short=SHORT, users="users.parquet", user_attributes=USER_ATTRS):
    d = {
        "data": {"window_start": WINDOW[0], "window_end": WINDOW[1], "timezone": TZ},
        "segments": {"long": dict(long), "short": dict(short)},
    }
    if users:
        d["data"]["users"] = users
        d["user_attributes"] = [dict(u) for u in user_attributes]
    return schema_from_dict(d, root)


# -- random raw data ------------------------------------------------------------------------------
def random_times(rng, n):
    """Bursts inside and around the window (some rows fall outside it), gaps of exactly 30 min."""
    out, t = [], WS
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            t = int(rng.integers(WS - 2 * 86400, WE + 2 * 86400))
        else:
            t += int(rng.choice([0, 1, 1799, 1800, 1801, 3600, 20000, 86400]))
        out.append(t)
    return out


def sticky_users(rng, n, n_users):
    """User of each event: often the previous one again, so that users have bursts of events."""
    out = [int(rng.integers(0, n_users))]
    for _ in range(n - 1):
        out.append(out[-1] if rng.random() < 0.7 else int(rng.integers(0, n_users)))
    return out


def long_rows(rng, n, n_users):
    times, users = random_times(rng, n), sticky_users(rng, n, n_users)
    rows = []
    for i in range(n):
        rows.append(
            {
                "user_id": None if rng.random() < 0.04 else users[i] * 7,
                "ts": None if rng.random() < 0.04 else times[i],
                "action": None if rng.random() < 0.05 else str(rng.choice(["buy", "use", "return"])),
                "shop": None if rng.random() < 0.05 else int(rng.zipf(1.4)) % 40,
            }
        )
    return rows


def short_rows(rng, n, n_users):
    times, users = random_times(rng, n), sticky_users(rng, n, n_users)
    return [
        {
            "uid": None if rng.random() < 0.03 else users[i] * 7 + 1,
            "t_ms": None if rng.random() < 0.03 else times[i] * 1000 + int(rng.integers(0, 1000)),
            "action": str(rng.choice(["click", "view", "search", "cart"])),
            "device": None if rng.random() < 0.1 else str(rng.choice(["ios", "android", "web"])),
        }
        for i in range(n)
    ]


def user_rows(rng, n_users):
    rows = [
        {
            "user_id": u * 7,
            "age": None if rng.random() < 0.1 else float(rng.integers(10, 80)),
            "gender": str(rng.choice(["f", "m", "x", "rare"], p=[0.45, 0.45, 0.08, 0.02])),
        }
        for u in range(0, n_users + 5, 2)
    ]  # some users only here, some never here
    rows.append({"user_id": None, "age": 30.0, "gender": "f"})  # bad row
    rows.append({"user_id": rows[0]["user_id"], "age": 99.0, "gender": "m"})  # duplicate: first wins
    return rows


LONG_TYPES = {"user_id": pa.int64(), "ts": pa.int64(), "action": pa.string(), "shop": pa.int64()}


def to_table(rows, types):
    return pa.table({c: pa.array([r[c] for r in rows], t) for c, t in types.items()})


def write_mixed(rows, folder: Path):
    """Split rows in order over a Parquet, a CSV, a CSV.gz and an Arrow IPC file (sorted names)."""
    folder.mkdir()
    parts = np.array_split(np.arange(len(rows)), 4)
    chunks = [[rows[i] for i in p] for p in parts]
    # part-0: Parquet, integer epoch seconds, tiny row groups.
    pq.write_table(to_table(chunks[0], LONG_TYPES), folder / "part-0.parquet", row_group_size=5)
    # part-1: CSV with naive timestamps (naive = UTC).
    t = to_table(chunks[1], LONG_TYPES)
    t = t.set_column(1, "ts", t.column("ts").cast(pa.timestamp("s")))
    pcsv.write_csv(t, folder / "part-1.csv")
    # part-2: gzipped CSV with integer epochs.
    buf = pyio.BytesIO()
    pcsv.write_csv(to_table(chunks[2], LONG_TYPES), buf)
    (folder / "part-2.csv.gz").write_bytes(gzip.compress(buf.getvalue()))
    # part-3: Arrow IPC, tz-aware millisecond timestamps, int32 shops, dictionary actions, several batches.
    t = to_table(chunks[3], LONG_TYPES)
    t = t.set_column(
        1,
        "ts",
        pa.array(
            [None if r["ts"] is None else r["ts"] * 1000 for r in chunks[3]],
            pa.timestamp("ms", tz="Asia/Tokyo"),
        ),
    )
    t = t.set_column(3, "shop", t.column("shop").cast(pa.int32()))
    t = t.set_column(2, "action", t.column("action").combine_chunks().dictionary_encode())
    with ipc.new_file(folder / "part-3.arrow", t.schema) as w:
        for b in t.to_batches(max_chunksize=6):
            w.write_batch(b)
    (folder / "_SUCCESS").write_text("")  # marker files are ignored


def write_inputs(root: Path, seed=0, n_long=900, n_short=1200, n_users=60):
    rng = np.random.default_rng(seed)
    lr, sr, ur = long_rows(rng, n_long, n_users), short_rows(rng, n_short, n_users), user_rows(rng, n_users)
    write_mixed(lr, root / "long")
    pq.write_table(
        to_table(sr, {"uid": pa.int64(), "t_ms": pa.int64(), "action": pa.string(), "device": pa.string()}),
        root / "short.parquet",
        row_group_size=16,
    )
    pq.write_table(
        to_table(ur, {"user_id": pa.int64(), "age": pa.float64(), "gender": pa.string()}),
        root / "users.parquet",
    )
    return lr, sr, ur


# -- the expectation ------------------------------------------------------------------------------
REASONS = ("null_user", "invalid_utf8", "null_time", "bad_time", "outside_window", "duplicate")


def expected_segment(rows, seg, user_col, time_col, per_s):
    dropped = Counter({r: 0 for r in REASONS})
    kept = []
    for r in rows:
        if r[user_col] is None or r[user_col] == "":
            dropped["null_user"] += 1
        elif r[time_col] is None:
            dropped["null_time"] += 1
        elif not WS <= r[time_col] // per_s < WE:
            dropped["outside_window"] += 1
        else:
            kept.append(r)

    def values(rows):
        times = [r[time_col] // per_s for r in rows]
        columns = []
        for a in seg["attributes"]:
            col = a.get("column", a["name"])
            if col == "@hour":
                columns.append([reference.hour_of_day(t, TZ) for t in times])
            elif col == "@weekday":
                columns.append([reference.weekday(t, TZ) for t in times])
            else:
                columns.append([r[col] for r in rows])
        return times, columns

    # Vocabularies count every good row, duplicates included (they are found after counting).
    vocabs = [
        reference.vocabulary(v, a.get("min_count", 1), a.get("max_vocab"))
        for v, a in zip(values(kept)[1], seg["attributes"])
    ]
    read_cols = [a.get("column", a["name"]) for a in seg["attributes"] if not a.get("column", "").startswith("@")]
    kept, repeats = reference.drop_duplicates(kept, [user_col, time_col, *read_cols])
    dropped["duplicate"] = repeats
    times, columns = values(kept)
    words = reference.all_words(
        [r[user_col] for r in kept],
        times,
        rule=seg["word_rule"],
        position_unit=seg["position_unit"],
        timezone=TZ,
        window_start_utc=WS,
        gap_minutes=seg.get("gap_minutes", 30.0),
        max_words=seg["max_words"],
        max_actions_per_word=seg["max_actions_per_word"],
    )
    encoded = {
        u: [
            (
                pos,
                [tuple(reference.encode(columns[k][i], vocabs[k]) for k in range(len(vocabs))) for i in idx],
            )
            for pos, idx in ws
        ]
        for u, ws in words.items()
    }
    return encoded, vocabs, dict(dropped), len(kept)


def actual_segment(data, name):
    seg = data.segment(name)
    out = {}
    ids = data.user_ids.to_pylist()
    wo = seg.word_offsets()
    for u in range(data.num_users):
        w0, w1 = seg.user_word_offsets[u], seg.user_word_offsets[u + 1]
        if w0 == w1:
            assert seg.user_action_offsets[u] == seg.user_action_offsets[u + 1]
            continue
        assert wo[w0] == seg.user_action_offsets[u] and wo[w1] == seg.user_action_offsets[u + 1]
        out[ids[u]] = [
            (int(seg.word_pos[w]), [tuple(int(x) for x in row) for row in seg.attr_ids[wo[w] : wo[w + 1]]])
            for w in range(w0, w1)
        ]
    return out


def check_against_reference(data, manifest, lr, sr, ur):
    exp_long, voc_long, drop_long, n_long = expected_segment(lr, LONG, "user_id", "ts", 1)
    exp_short, voc_short, drop_short, n_short = expected_segment(sr, SHORT, "uid", "t_ms", 1000)
    assert actual_segment(data, "long") == exp_long
    assert actual_segment(data, "short") == exp_short
    for name, attrs, vocabs in (
        ("long", LONG["attributes"], voc_long),
        ("short", SHORT["attributes"], voc_short),
    ):
        for a, v in zip(attrs, vocabs):
            assert data.vocab(name, a["name"]).to_pylist() == v
        assert manifest["segments"][name]["vocab_sizes"] == [len(v) + 2 for v in vocabs]

    # Users: every good id of either segment or the user table, in (user hash, id) order.
    good_users = [r for r in ur if r["user_id"] is not None]
    first = {}
    for r in good_users:
        first.setdefault(r["user_id"], r)
    kept_long = {
        r["user_id"] for r in lr if r["user_id"] is not None and r["ts"] is not None and WS <= r["ts"] < WE
    }
    kept_short = {
        r["uid"]
        for r in sr
        if r["uid"] is not None and r["t_ms"] is not None and WS <= r["t_ms"] // 1000 < WE
    }
    users = reference.user_order(kept_long | kept_short | set(first))
    assert data.user_ids.to_pylist() == users
    assert data.user_ids.type == pa.int64()

    # User attributes: first row per user; age bucketed; users without a row -> 1.
    age_vals = [reference.bucket(r["age"], [18, 30, 50]) for r in first.values()]
    gender_vals = [r["gender"] for r in first.values()]
    age_voc, gender_voc = reference.vocabulary(age_vals), reference.vocabulary(gender_vals, 2)
    assert data.vocab("user", "age").to_pylist() == age_voc
    assert data.vocab("user", "gender").to_pylist() == gender_voc
    for row, u in enumerate(users):
        r = first.get(u)
        exp = (
            (1, 1)
            if r is None
            else (
                reference.encode(reference.bucket(r["age"], [18, 30, 50]), age_voc),
                reference.encode(r["gender"], gender_voc),
            )
        )
        assert tuple(data.user_attr_ids[row]) == exp

    c = manifest["counts"]
    assert c["users"] == len(users)
    assert c["events_read"] == len(lr) + len(sr)
    assert manifest["dropped"]["long"] == drop_long
    assert manifest["dropped"]["short"] == drop_short
    assert manifest["dropped"]["user"] == {"null_user": 1, "invalid_utf8": 0, "duplicate_user": 1}
    for name, exp, n in (("long", exp_long, n_long), ("short", exp_short, n_short)):
        seg = c[name]
        assert seg["events"] == n
        assert seg["words"] == sum(len(w) for w in exp.values())
        assert seg["actions"] == sum(len(a) for w in exp.values() for _, a in w)
        assert seg["actions"] + seg["actions_capped"] <= n  # the rest went with truncated words
    return exp_long, exp_short


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_end_to_end_matches_reference(tmp_path, seed):
    lr, sr, ur = write_inputs(tmp_path, seed)
    schema = schema_for(tmp_path)
    manifest = tokenize(schema, tmp_path / "tok", shard_users=1000, progress=False, batch_rows=7)
    data = open_tokenized(tmp_path / "tok", verify=True)
    check_against_reference(data, manifest, lr, sr, ur)
    assert manifest == json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["schema"] == schema.to_dict()
    assert manifest["segments"]["long"]["num_positions"] == schema.num_positions(schema.segments["long"])
    assert manifest["segments"]["short"]["dims"] == [4, 2, 2]
    assert manifest["segments"]["short"]["max_words"] == 7
    assert manifest["user_attributes"]["names"] == ["age", "gender"]
    for seg in data.segments:
        assert seg.word_pos.min() >= 0
        assert seg.word_pos.max() < manifest["segments"][seg.name]["num_positions"]
        assert seg.attr_ids.min() >= 1  # 0 (padding) is never produced
        assert seg.attr_ids.flags.c_contiguous and seg.attr_ids.dtype == np.int32


def test_truncation_and_cap_counts(tmp_path):
    """words_truncated / actions_capped against counts derived from the uncapped reference."""
    lr, sr, ur = write_inputs(tmp_path, 3)
    manifest = tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)
    for rows, seg, ucol, tcol, per_s in ((lr, LONG, "user_id", "ts", 1), (sr, SHORT, "uid", "t_ms", 1000)):
        big = dict(seg, max_words=10**6, max_actions_per_word=10**6)
        full, _, _, n = expected_segment(rows, big, ucol, tcol, per_s)
        kept_words = [w[-seg["max_words"] :] for w in full.values()]
        c = manifest["counts"]["long" if seg is LONG else "short"]
        assert c["words_truncated"] == sum(len(w) for w in full.values()) - sum(len(w) for w in kept_words)
        capped = sum(max(0, len(a) - seg["max_actions_per_word"]) for w in kept_words for _, a in w)
        assert c["actions_capped"] == capped
        assert c["words_truncated"] > 0 and capped > 0  # the data exercises both


def test_multi_shard_equals_single_shard_and_is_deterministic(tmp_path):
    write_inputs(tmp_path, 2)
    schema = schema_for(tmp_path)
    m1 = tokenize(schema, tmp_path / "one", shard_users=10**6, progress=False)
    m2 = tokenize(schema, tmp_path / "many", shard_users=7, progress=False, batch_rows=13)
    n_users = m1["counts"]["users"]
    # Shards are 2**k hash ranges with about shard_users users each (k = log2 of users/7, rounded).
    bits = m2["sharding"]["shard_bits"]
    assert len(m1["shards"]) == 1 and len(m2["shards"]) == 2**bits
    assert 2 ** (bits - 1) < n_users / 7 * 2**0.5 and n_users / 7 / 2**0.5 <= 2**bits
    ids = open_tokenized(tmp_path / "one").user_ids.to_pylist()
    assert [s["users"] for s in m2["shards"]] == [
        sum(reference.shard_of(u, bits) == s for u in ids) for s in range(2**bits)
    ]
    a, b = open_tokenized(tmp_path / "one"), open_tokenized(tmp_path / "many", verify=True)
    # One shard is sorted by id; many shards are by shard, then id.  Same users, same words.
    assert a.user_ids.to_pylist() == sorted(ids)
    assert b.user_ids.to_pylist() == reference.user_order(ids, bits)
    rows = b.user_index(a.user_ids)
    np.testing.assert_array_equal(a.user_attr_ids, b.user_attr_ids[rows])
    for name in ("long", "short"):
        assert actual_segment(a, name) == actual_segment(b, name)
    strip = ("shards", "sharding")
    assert {k: v for k, v in m1.items() if k not in strip} == {k: v for k, v in m2.items() if k not in strip}
    # Single shard: the big arrays are views of the memory map, not copies.
    assert a.segments[0].attr_ids.base is not None and not a.segments[0].attr_ids.flags.owndata
    # Tokenizing again gives byte-identical shards and vocabularies.
    m3 = tokenize(schema, tmp_path / "again", shard_users=7, progress=False)
    assert m3 == m2
    for f in sorted((tmp_path / "many").rglob("*.arrow")):
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "many")).read_bytes(), f
    # Re-tokenizing into a used directory with fewer shards removes the stale ones.
    tokenize(schema, tmp_path / "many", shard_users=10**6, progress=False)
    assert [p.name for p in (tmp_path / "many" / "shards").iterdir()] == ["shard-00000.arrow"]


def test_strict_mode_names_file_row_and_reason(tmp_path):
    d = tmp_path / "long"
    d.mkdir()
    good = {"user_id": [1, 2, 3], "ts": [WS, WS + 10, WS + 20], "action": ["a", "b", "c"], "shop": [1, 2, 3]}
    pq.write_table(pa.table(good), d / "a.parquet")
    bad = dict(good, ts=[WS, WE, WS])  # row 1 is outside the window (end is exclusive)
    pcsv.write_csv(pa.table(bad), d / "b.csv")
    short = {"uid": [1], "t_ms": [WS * 1000], "action": ["x"], "device": ["ios"]}
    pq.write_table(pa.table(short), tmp_path / "short.parquet")
    schema = schema_for(tmp_path, users=None)
    with pytest.raises(ValueError, match=r"b\.csv: row 1 \(0-based\): time outside the segment window"):
        tokenize(schema, tmp_path / "tok", strict=True, progress=False, batch_rows=2)
    assert not (tmp_path / "tok" / "manifest.json").exists()
    pcsv.write_csv(pa.table(dict(good, user_id=[1, None, 3])), d / "b.csv")
    with pytest.raises(
        ValueError, match=r"b\.csv: row 1 \(0-based\): null or empty user id \(column 'user_id'\)"
    ):
        tokenize(schema, tmp_path / "tok", strict=True, progress=False)
    pcsv.write_csv(pa.table(dict(good, ts=pa.array([WS, WS, None], pa.int64()))), d / "b.csv")
    with pytest.raises(ValueError, match=r"b\.csv: row 2 \(0-based\): null time \(column 'ts'\)"):
        tokenize(schema, tmp_path / "tok", strict=True, progress=False)
    # Not strict: counted, not raised.
    m = tokenize(schema, tmp_path / "tok", progress=False)
    # (b.csv's first row repeats a.parquet's first row.)
    assert m["dropped"]["long"] == dict.fromkeys(REASONS, 0) | {"null_time": 1, "duplicate": 1}
    # Duplicates are found after reading; strict mode still names the repeated row.
    pcsv.write_csv(pa.table(dict(good, user_id=[7, 8, 1], ts=[WS, WS, WS], action=["x", "y", "a"],
                                 shop=[5, 5, 1])), d / "b.csv")
    m = tokenize(schema, tmp_path / "tok", progress=False)
    assert m["dropped"]["long"] == dict.fromkeys(REASONS, 0) | {"duplicate": 1}
    with pytest.raises(ValueError, match=r"b\.csv: row 2 \(0-based\): duplicate event \(user 1, "):
        tokenize(schema, tmp_path / "tok", strict=True, progress=False)
    # The user table too.
    pcsv.write_csv(pa.table(dict(good, user_id=[4, 5, 6])), d / "b.csv")
    pq.write_table(
        pa.table({"user_id": [1, 2, 1], "age": [20.0, 30.0, 40.0], "gender": ["f", "m", "f"]}),
        tmp_path / "users.parquet",
    )
    with pytest.raises(ValueError, match=r"users\.parquet: row 2 \(0-based\): duplicate user id 1"):
        tokenize(schema_for(tmp_path), tmp_path / "tok", strict=True, progress=False)


def test_missing_column_names_file_and_column_before_any_work(tmp_path):
    write_inputs(tmp_path, 0)
    schema = schema_for(tmp_path, short=dict(SHORT, attributes=[dict(name="action"), dict(name="colour")]))
    with pytest.raises(
        InputError,
        match=r"short\.parquet: column 'colour' \(segment short\) not found; "
        r"the file has columns: uid, t_ms, action, device",
    ):
        tokenize(schema, tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()  # nothing was written
    schema = schema_for(tmp_path, short=dict(SHORT, time_column="when"))
    with pytest.raises(InputError, match="column 'when'"):
        tokenize(schema, tmp_path / "tok", progress=False)
    schema = schema_for(tmp_path, user_attributes=[dict(name="height")])
    with pytest.raises(InputError, match=r"users\.parquet: column 'height' \(user table\) not found"):
        tokenize(schema, tmp_path / "tok", progress=False)


def test_mistyped_time_column_is_a_clear_error(tmp_path):
    write_inputs(tmp_path, 0)
    pq.write_table(
        pa.table({"uid": [1], "t_ms": [[1, 2]], "action": ["x"], "device": ["a"]}),
        tmp_path / "short.parquet",
    )
    with pytest.raises(InputError, match=r"short\.parquet: column 't_ms': time column must be .* got list"):
        tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()
    pq.write_table(
        pa.table({"uid": [1], "t_ms": [1], "action": [[1]], "device": ["a"]}),
        tmp_path / "short.parquet",
    )
    with pytest.raises(InputError, match=r"short\.parquet: column 'action' \(segment short, attribute action\): "
                       r"expected strings, integers or floats, got list"):
        tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)


def test_vocab_dir_reuse_maps_new_values_to_unknown(tmp_path):
    write_inputs(tmp_path, 0)
    first = tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": [5, 5],
                "ts": [WS + 100, WS + 200],
                "action": ["buy", "brand-new"],
                "shop": [999, 999],
            }
        ),
        other / "long.parquet",
    )
    pq.write_table(
        pa.table({"uid": [5], "t_ms": [WS * 1000], "action": ["view"], "device": ["ios"]}),
        other / "short.parquet",
    )
    pq.write_table(
        pa.table({"user_id": [5, 6], "age": [22.0, None], "gender": ["f", "nobody"]}), other / "users.parquet"
    )
    schema = schema_for(other, long=dict(LONG, path="long.parquet"))
    m = tokenize(schema, other / "tok", vocab_dir=tmp_path / "tok" / "vocab", progress=False)
    assert m["segments"] == first["segments"]  # same vocabularies, same sizes
    data = open_tokenized(other / "tok")
    long = data.segment("long")
    buy = data.vocab("long", "action").to_pylist().index("buy") + 2
    assert long.attr_ids[:, 0].tolist() == [buy, 1]  # "brand-new" is unknown
    assert long.attr_ids[:, 1].tolist() == [1, 1]  # shop 999 was never seen
    assert data.user_attr_ids[:, 1].tolist()[1] == 1  # gender "nobody" is unknown
    with pytest.raises(FileNotFoundError, match="long.action.arrow"):
        tokenize(schema, other / "tok2", vocab_dir=other, progress=False)


def test_string_user_ids_and_users_only_in_user_table(tmp_path):
    (tmp_path / "long").mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(["b", "", None, "a", "b"], pa.large_string()),
                "ts": [WS + 5 * 3600, WS, WS, WS + 3600, WS + 5 * 3600 + 86400],
                "action": ["x", "x", "x", "y", "y"],
                "shop": [1, 1, 1, 2, 2],
            }
        ),
        tmp_path / "long" / "p.parquet",
    )
    pq.write_table(
        pa.table({"uid": ["c"], "t_ms": [WS * 1000], "action": ["v"], "device": ["ios"]}),
        tmp_path / "short.parquet",
    )
    pq.write_table(
        pa.table({"user_id": ["z", "a"], "age": [40, 20], "gender": ["f", "f"]}), tmp_path / "users.parquet"
    )
    m = tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)
    data = open_tokenized(tmp_path / "tok")
    order = reference.user_order(["a", "b", "c", "z"])
    assert data.user_ids.to_pylist() == order
    assert m["dropped"]["long"]["null_user"] == 2
    long, short = data.segment("long"), data.segment("short")
    row = {u: order.index(u) for u in order}
    n_long = np.diff(long.user_word_offsets)
    assert [n_long[row[u]] for u in "abcz"] == [1, 2, 0, 0]
    assert [np.diff(short.user_word_offsets)[row[u]] for u in "abcz"] == [0, 0, 1, 0]
    # Day 0 runs from 04:00 on Mar 19 (the window opens at 00:00 on Mar 20, before 04:00):
    # a at 01:00 Mar 20 -> 0; b at 05:00 Mar 20 -> 1 and at 05:00 Mar 21 -> 2.
    pos = {u: long.word_pos[long.user_word_offsets[row[u]] : long.user_word_offsets[row[u] + 1]].tolist()
           for u in "ab"}
    assert pos == {"a": [0], "b": [1, 2]}
    # age buckets: a (20) -> bucket 1, z (40) -> bucket 2; equal counts, so ids by bucket value.
    expected = {"a": [2, 2], "b": [1, 1], "c": [1, 1], "z": [3, 2]}
    assert [data.user_attr_ids[row[u]].tolist() for u in "abcz"] == [expected[u] for u in "abcz"]
    assert data.user_index(["z", "nope", "a"]).tolist() == [row["z"], -1, row["a"]]
    assert data.user_index(pa.array(["b"], pa.large_string())).tolist() == [row["b"]]


def test_empty_input_writes_one_empty_shard(tmp_path):
    (tmp_path / "long").mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([], pa.int64()),
                "ts": pa.array([], pa.int64()),
                "action": pa.array([], pa.string()),
                "shop": pa.array([], pa.int64()),
            }
        ),
        tmp_path / "long" / "p.parquet",
    )
    pq.write_table(
        pa.table({"uid": pa.array([], pa.int64()), "t_ms": pa.array([], pa.int64()),
                  "action": pa.array([], pa.string()), "device": pa.array([], pa.string())}),
        tmp_path / "short.parquet",
    )
    m = tokenize(schema_for(tmp_path, users=None), tmp_path / "tok", progress=False)
    assert m["counts"]["users"] == 0 and len(m["shards"]) == 1
    assert m["counts"]["events_read"] == 0 and "warnings" not in m
    data = open_tokenized(tmp_path / "tok", verify=True)
    assert data.num_users == 0 and data.segment("long").attr_ids.shape == (0, 3)
    assert data.user_attr_ids.shape == (0, 0)
    assert data.vocab("long", "action").to_pylist() == []
    assert data.user_index([1, 2]).tolist() == [-1, -1]


def test_open_tokenized_errors(tmp_path):
    write_inputs(tmp_path, 0)
    tok = tmp_path / "tok"
    tokenize(schema_for(tmp_path), tok, progress=False)
    data = open_tokenized(tok)
    assert data.user_index(np.array([0, 7, 3])).tolist()[1] == data.user_ids.to_pylist().index(7)
    manifest = (tok / "manifest.json").read_text()

    (tok / "manifest.json").write_text(manifest.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ManifestError, match="format_version 99 is not supported"):
        open_tokenized(tok)
    (tok / "manifest.json").write_text(manifest[:50])
    with pytest.raises(ManifestError, match="corrupt manifest"):
        open_tokenized(tok)
    (tok / "manifest.json").write_text(manifest)
    shard = tok / "shards" / "shard-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        open_tokenized(tok, verify=True)
    (tok / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json: not found"):
        open_tokenized(tok)


def test_input_resolution(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.parquet", "d/a.csv", "d/sub/c.csv.gz", "d/_SUCCESS", "d/.hidden.csv", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_inputs(tmp_path / "d")] == [
        "d/a.csv",
        "d/b.parquet",
        "d/sub/c.csv.gz",
    ]
    assert [p.name for p in resolve_inputs(tmp_path / "d" / "*.parquet")] == ["b.parquet"]
    with pytest.raises(InputError, match="unsupported input file type"):
        resolve_inputs(tmp_path / "d" / "notes.txt")
    with pytest.raises(InputError, match="no such file"):
        resolve_inputs(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match="matches no input files"):
        resolve_inputs(tmp_path / "d" / "*.arrow")


def test_read_table_for_label_files(tmp_path):
    pq.write_table(
        pa.table({"user_id": pa.array([3, 1], pa.int32()), "label": [1, 0], "x": [0, 0]}),
        tmp_path / "labels.parquet",
    )
    t = read_table(tmp_path / "labels.parquet", columns=["user_id", "label"])
    assert t.column_names == ["user_id", "label"] and t.column("user_id").type == pa.int64()
    with pytest.raises(InputError, match="column 'y'"):
        read_table(tmp_path / "labels.parquet", columns=["y"])


def test_num_positions_counts_wall_clock_days_across_dst(tmp_path):
    """A window from 03:59 to 04:01 the next day across the spring DST switch touches three
    04:00-days but is only 23 h long in UTC: num_positions must count wall-clock days (3)."""
    long = dict(
        LONG, path="long.parquet", window_start="2026-03-28T03:59:00", window_end="2026-03-29T04:01:00"
    )
    times = [utc("2026-03-28T03:59:30"), utc("2026-03-29T04:00:30")]
    pq.write_table(
        pa.table({"user_id": [1, 1], "ts": times, "action": ["a", "b"], "shop": [1, 2]}),
        tmp_path / "long.parquet",
    )
    pq.write_table(
        pa.table({"uid": [1], "t_ms": [WS * 1000], "action": ["v"], "device": ["ios"]}),
        tmp_path / "short.parquet",
    )
    schema = schema_for(tmp_path, long=long, users=None)
    assert schema.num_positions(schema.segments["long"]) == 3
    m = tokenize(schema, tmp_path / "tok", progress=False)
    assert open_tokenized(tmp_path / "tok").segment("long").word_pos.tolist() == [0, 2]
    assert m["segments"]["long"]["num_positions"] == 3


def test_user_id_types_must_agree_across_inputs(tmp_path):
    write_inputs(tmp_path, 0)
    pq.write_table(pa.table({"user_id": ["a"], "age": [1.0], "gender": ["f"]}), tmp_path / "users.parquet")
    with pytest.raises(
        InputError,
        match=r"user ids must have one type .* int64 in .*part-0\.parquet; "
        r"string in .*users\.parquet",
    ):
        tokenize(schema_for(tmp_path), tmp_path / "tok", progress=False)
