"""Inputs beyond the happy path: one table holding several segments, string times, non-UTF-8
bytes, unparseable times, bad rows counted by reason (and fatal with --strict), the
accounting identities, and the command line (tokenize, merge, inspect)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main
from tokenizer import reference, shards
from tokenizer.io import InputError
from tokenizer.manifest import check_accounting
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import open_tokenized

WS = 1767225600  # 2026-01-01T00:00:00Z
DATA = {"window_start": "2026-01-01T00:00:00", "window_end": "2026-01-08T00:00:00", "timezone": "UTC"}


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


def _bad_utf8(values: list[bytes | None]) -> pa.Array:
    """A string array holding arbitrary bytes (pyarrow validates only on request)."""
    offsets = np.cumsum([0] + [len(v or b"") for v in values]).astype(np.int32)
    valid = np.array([v is not None for v in values])
    return pa.Array.from_buffers(pa.string(), len(values), [pa.array(valid).buffers()[1], pa.py_buffer(offsets),
                                                            pa.py_buffer(b"".join(v or b"" for v in values))])


def test_one_table_with_a_segment_column(tmp_path):
    """Rows go to the segment named by their `kind` value; the table is read once; rows of no
    segment are counted as unrouted."""
    (tmp_path / "events").mkdir()
    rows = {
        "uid": [1, 1, 2, 2, 3, 1, None],
        "ts": [WS + 10, WS + 20, WS + 30, WS + 86400, WS + 5, WS + 40, WS],
        "kind": ["buy", "view", "view", "buy", "refund", "view", "buy"],
        "item": ["a", "b", "c", "a", "z", "b", "a"],
    }
    pq.write_table(pa.table(rows), tmp_path / "events" / "p.parquet")
    seg = {"path": "events", "user_column": "uid", "segment_column": "kind", "position_unit": "day",
           "attributes": [{"name": "item"}]}
    schema = schema_from_dict({"data": DATA, "segments": {
        "long": {**seg, "word_rule": "daily", "segment_values": ["buy"]},
        "short": {**seg, "word_rule": "session", "segment_values": ["view"]},
    }}, tmp_path)
    m = tokenize(schema, tmp_path / "tok", progress=False)
    assert check_accounting(m) == []
    c = m["counts"]
    assert (c["events_read"], c["events_unrouted"]) == (7, 1)
    assert (c["long"]["events_read"], c["short"]["events_read"]) == (3, 3)
    assert m["dropped"]["long"]["null_user"] == 1
    data = open_tokenized(tmp_path / "tok")
    assert data.user_ids.to_pylist() == [1, 2]  # user 3 had only an unrouted row
    long, short = data.segment("long"), data.segment("short")
    assert np.diff(long.user_word_offsets).tolist() == [1, 1]
    assert np.diff(short.user_word_offsets).tolist() == [1, 1]
    assert short.word_len.tolist() == [2, 1]  # user 1's two views are one session
    # A value claimed by two segments is a configuration error.
    bad = schema_from_dict({"data": DATA, "segments": {
        "long": {**seg, "word_rule": "daily", "segment_values": ["buy"]},
        "short": {**seg, "word_rule": "session", "segment_values": ["buy", "view"]},
    }}, tmp_path)
    with pytest.raises(InputError, match="value 'buy' is also claimed by segment 'long'"):
        tokenize(bad, tmp_path / "tok2", progress=False)


def test_string_times_non_utf8_and_unparseable_values_are_counted(tmp_path):
    csv = (
        "uid,when,shop\n"
        "1,2026-01-01T10:00:00Z,a\n"
        "1,2026-01-01 10:20:00,b\n"  # naive: UTC
        "2,yesterday,c\n"  # unparseable
        "2,2026-01-02T09:00:00+09:00,\xff\xfe\n"  # not UTF-8 (the bytes below are raw)
        "3,,d\n"  # null time
        ",2026-01-01T10:00:00Z,e\n"  # null user
        "4,2026-02-01T00:00:00Z,f\n"  # outside the window
        "1,2026-01-01T10:20:00.000+00:00,b\n"  # the second row again: a duplicate
    ).encode("latin-1")
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "a.csv.gz").write_bytes(gzip.compress(csv))
    pq.write_table(pa.table({"uid": [5, 5], "when": ["2026-01-03T00:00:00Z", "2026-01-03T00:01:00Z"],
                             "shop": _bad_utf8([b"ok", b"\xc3\x28"])}), tmp_path / "ev" / "b.parquet")
    schema = schema_from_dict({"data": DATA, "segments": {"ev": {
        "path": "ev", "user_column": "uid", "time_column": "when", "word_rule": "session",
        "position_unit": "hour", "attributes": [{"name": "shop"}]}}}, tmp_path)
    m = tokenize(schema, tmp_path / "tok", progress=False, batch_rows=3)
    assert m["dropped"]["ev"] == {"null_user": 1, "invalid_utf8": 2, "null_time": 1, "bad_time": 1,
                                  "outside_window": 1, "duplicate": 1}
    assert check_accounting(m) == []
    data = open_tokenized(tmp_path / "tok")
    assert data.user_ids.to_pylist() == [1, 5]
    ev = data.segment("ev")
    assert ev.word_len.tolist() == [2, 1] and ev.word_pos.tolist() == [10, 48]
    # Vocabularies are counted before duplicates are found: "b" counts twice.
    assert data.vocab("ev", "shop").to_pylist() == ["b", "a", "ok"]
    with pytest.raises(ValueError, match=r"a\.csv\.gz: row 2 \(0-based\): time that does not parse "
                                         r"\(column 'when'\)"):
        tokenize(schema, tmp_path / "tok", progress=False, strict=True)
    (tmp_path / "ev" / "a.csv.gz").unlink()
    with pytest.raises(ValueError, match=r"b\.parquet: row 1 \(0-based\): string that is not valid UTF-8 "
                                         r"\(column 'shop'\)"):
        tokenize(schema, tmp_path / "tok", progress=False, strict=True)


def test_int_and_float_categories_and_booleans(tmp_path):
    pq.write_table(pa.table({"user_id": [1, 1, 1, 2], "ts": [WS, WS + 1, WS + 2, WS + 3],
                             "score": [0.5, -0.0, 0.0, float("nan")], "flag": [True, False, True, None]}),
                   tmp_path / "ev.parquet")
    schema = schema_from_dict({"data": DATA, "segments": {"ev": {
        "path": "ev.parquet", "word_rule": "session", "position_unit": "hour",
        "attributes": [{"name": "score"}, {"name": "flag"}]}}}, tmp_path)
    tokenize(schema, tmp_path / "tok", progress=False)
    data = open_tokenized(tmp_path / "tok")
    assert data.vocab("ev", "score").to_pylist() == [0.0, 0.5]  # -0.0 is 0.0; NaN is null
    assert data.vocab("ev", "flag").to_pylist() == [1, 0]
    assert data.segment("ev").attr_ids.tolist() == [[3, 2], [2, 3], [2, 2], [1, 1]]


def test_cli_tokenize_jobs_merge_and_inspect(tmp_path, capsys):
    from tokenizer.synthetic import generate

    generate(tmp_path / "raw", 60, seed=3, n_genres=20, n_shops=40, progress=False, event_order="time")
    schema = str(tmp_path / "raw" / "schema.toml")
    assert main(["tokenize", "-q", "--schema", schema, "--out", str(tmp_path / "one"), "--shard-users", "20",
                 "--memory-limit", "1G", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "tokenized 60 users" in err and "events/s" in err and "dropped rows: none" in err
    for i in range(2):
        assert main(["tokenize", "-q", "--schema", schema, "--out", str(tmp_path / f"job{i}"), "--shard-users", "20",
                     "--num-shards", "2", "--shard-index", str(i)]) == 0
    assert main(["merge", "--out", str(tmp_path / "merged"), str(tmp_path / "job0"), str(tmp_path / "job1"),
                 "--verify"]) == 0
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text()) == one
    capsys.readouterr()
    data = open_tokenized(tmp_path / "one")
    uid = data.user_ids[5].as_py()
    assert main(["inspect", "--data", str(tmp_path / "one"), "--user", str(uid), "--max-words", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"user {uid} (row 5 of 60)")
    assert "attributes: gender=" in out and "long:" in out and "short:" in out
    assert "action=" in out and "expense=[" in out and "(2026-" in out
    # The words listed are the user's: count them.
    long = data.segment("long")
    n_words = int(long.user_word_offsets[6] - long.user_word_offsets[5])
    assert f"long: {n_words} words" in out
    assert main(["inspect", "--data", str(tmp_path / "one"), "--user", "nobody"]) == 2
    assert main(["tokenize", "--schema", schema, "--out", str(tmp_path / "x"), "--memory-limit", "1K"]) == 2


def test_user_order_is_by_shard_then_id(tmp_path):
    ids = [f"user-{i}" for i in range(40)]
    pq.write_table(pa.table({"user_id": ids, "ts": [WS + i for i in range(40)], "a": ["x"] * 40}),
                   tmp_path / "ev.parquet")
    schema = schema_from_dict({"data": DATA, "segments": {"ev": {
        "path": "ev.parquet", "word_rule": "session", "position_unit": "hour", "attributes": [{"name": "a"}]}}},
        tmp_path)
    m = tokenize(schema, tmp_path / "tok", progress=False, shard_users=10)
    bits = m["sharding"]["shard_bits"]
    assert bits == 2
    data = open_tokenized(tmp_path / "tok", verify=True)
    assert data.user_ids.to_pylist() == reference.user_order(ids, bits)
    assert [s["users"] for s in m["shards"]] == [sum(reference.shard_of(u, bits) == s for u in ids)
                                                 for s in range(4)]
