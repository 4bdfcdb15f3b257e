"""Vocabulary counting, cutoffs, ids and encoding; derived values; time normalisation."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from tokenizer import reference
from tokenizer.io import InputError, epoch_seconds, local_seconds
from tokenizer.schema import AttributeSpec
from tokenizer.vocab import ValueCounter, Vocab, attribute_values, bucketize, vocab_file


def counts_of(values, batch_size, dictionary=False):
    c = ValueCounter("test")
    for i in range(0, len(values), batch_size):
        arr = pa.array(values[i : i + batch_size])
        c.update(arr.dictionary_encode() if dictionary else arr)
    v, n = c.result()
    return dict(zip(v.to_pylist(), n.tolist()))


@pytest.mark.parametrize("dictionary", [False, True])
def test_counts_merge_across_batches_and_ignore_nulls(dictionary):
    rng = np.random.default_rng(0)
    values = [None if rng.random() < 0.1 else f"v{int(rng.zipf(1.5)) % 50}" for _ in range(3000)]
    expected = Counter(v for v in values if v is not None)
    for batch_size in (1, 7, 1000, 5000):
        assert counts_of(values, batch_size, dictionary) == expected


def test_counts_compact_many_distinct_values(monkeypatch):
    import tokenizer.vocab as vocab_mod

    monkeypatch.setattr(vocab_mod, "_COMPACT_ROWS", 50)
    rng = np.random.default_rng(1)
    values = rng.integers(0, 400, 5000).tolist()
    assert counts_of(values, 97) == Counter(values)


def test_counter_rejects_type_change():
    c = ValueCounter("segment long, attribute shop")
    c.update(pa.array([1, 2]))
    with pytest.raises(InputError, match="attribute shop.*type changes"):
        c.update(pa.array(["a"]))


@pytest.mark.parametrize("seed", range(4))
def test_vocab_matches_reference(seed):
    rng = np.random.default_rng(seed)
    kind = seed % 2
    raw = rng.zipf(1.3, 2000) % 200
    values = [f"s{x:03d}" for x in raw] if kind else [int(x) for x in raw]
    for min_count, max_vocab in ((1, None), (3, None), (1, 10), (5, 3), (2, 1000)):
        c = ValueCounter()
        c.update(pa.array(values))
        v = Vocab.from_counts(*c.result(), min_count=min_count, max_vocab=max_vocab)
        expected = reference.vocabulary(values, min_count, max_vocab)
        assert v.values.to_pylist() == expected
        assert v.size == len(expected) + 2
        if max_vocab is not None:
            assert v.size <= max_vocab


def test_ids_ties_by_ascending_value_and_reserved_ids():
    v = Vocab.from_counts(pa.array(["b", "a", "c", "d"]), np.array([2, 2, 5, 1]), min_count=2)
    assert v.values.to_pylist() == ["c", "a", "b"]  # 5, then the two 2s by value; "d" < min_count
    ids = v.encode(pa.array(["a", "b", "c", "d", None, "zzz"]))
    assert ids.dtype == np.int32
    assert ids.tolist() == [3, 4, 2, 1, 1, 1]
    assert v.decode(ids).to_pylist() == ["a", "b", "c", None, None, None]


def test_encode_dictionary_equals_plain_and_handles_null_indices():
    v = Vocab.from_counts(pa.array(["x", "y"]), np.array([3, 1]))
    arr = pa.array(["y", None, "x", "q", "y"])
    np.testing.assert_array_equal(v.encode(arr.dictionary_encode()), v.encode(arr))
    assert v.encode(arr).tolist() == [3, 1, 2, 1, 3]


def test_encode_casts_ints_and_refuses_mismatched_types():
    v = Vocab.from_counts(pa.array([10, 20], pa.int64()), np.array([1, 1]))
    assert v.encode(pa.array([20, 10, 30], pa.int32())).tolist() == [3, 2, 1]
    assert Vocab.from_counts(pa.array([], pa.string()), np.zeros(0, np.int64)).encode(
        pa.array(["a"])
    ).tolist() == [1]
    with pytest.raises(InputError, match="cannot be looked up"):
        v.encode(pa.array(["a"]))


@pytest.mark.parametrize("values", [["b", "a", "é", ""], [5, -3, 7]])
def test_save_load_roundtrip(tmp_path, values):
    v = Vocab.from_counts(pa.array(values), np.arange(len(values), 0, -1))
    path = vocab_file(tmp_path, "long", "shop")
    v.save(path)
    assert path.name == "long.shop.arrow"
    w = Vocab.load(path)
    assert w.values.equals(v.values) and w.values.type == v.values.type
    np.testing.assert_array_equal(w.counts, v.counts)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic writer left no temp file
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        Vocab.load(tmp_path / "nope.arrow")


def test_bucketize_is_searchsorted_right():
    b = [18, 25, 35]
    arr = pa.array([0, 17.9, 18, 24, 25, 34.5, 35, 99, None, float("nan")])
    got = bucketize(arr, b).to_pylist()
    assert got == [0, 0, 1, 1, 2, 2, 3, 3, None, None]
    assert got[:8] == [reference.bucket(x, b) for x in arr.to_pylist()[:8]]
    with pytest.raises(InputError, match="numeric"):
        bucketize(pa.array(["a"]), b, "users.parquet: column 'age'")


@pytest.mark.parametrize("tz", ["Europe/Berlin", "Asia/Tokyo", "America/New_York", "UTC"])
def test_local_time_and_derived_hour_weekday_match_zoneinfo(tz):
    rng = np.random.default_rng(5)
    start = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp())
    t = np.concatenate(
        [
            rng.integers(start, start + 365 * 86400, 3000),
            # Around the 2026 European and US DST switches.
            int(dt.datetime(2026, 3, 29, 1, tzinfo=dt.UTC).timestamp()) + np.arange(-7200, 7200, 599),
            int(dt.datetime(2026, 10, 25, 1, tzinfo=dt.UTC).timestamp()) + np.arange(-7200, 7200, 599),
            int(dt.datetime(2026, 3, 8, 7, tzinfo=dt.UTC).timestamp()) + np.arange(-7200, 7200, 599),
        ]
    ).astype(np.int64)
    local = local_seconds(t, tz)
    zone = zoneinfo.ZoneInfo(tz)
    expected = [
        int(dt.datetime.fromtimestamp(x, zone).replace(tzinfo=dt.UTC).timestamp()) for x in t.tolist()
    ]
    assert local.tolist() == expected
    hours = attribute_values(AttributeSpec("h", column="@hour"), None, local).to_pylist()
    days = attribute_values(AttributeSpec("d", column="@weekday"), None, local).to_pylist()
    assert hours == [reference.hour_of_day(x, tz) for x in t.tolist()]
    assert days == [reference.weekday(x, tz) for x in t.tolist()]


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Tokyo"])
def test_epoch_seconds_from_timestamps(unit, tz):
    per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    secs = np.array([1767225600, 1767225601, -5, 0], np.int64)
    raw = secs * per_s + (per_s - 1)  # sub-second parts are floored
    arr = pa.array(raw, pa.timestamp(unit, tz=tz))
    arr = pa.concat_arrays([arr, pa.array([None], arr.type)])
    got, valid = epoch_seconds(arr, "s", "x")  # time_unit is ignored for timestamps
    assert got[:4].tolist() == secs.tolist()
    assert valid.tolist() == [True] * 4 + [False]


def test_epoch_seconds_from_integers_and_floats():
    got, valid = epoch_seconds(pa.array([1767225600123, None, -1], pa.int64()), "ms", "x")
    assert got[[0, 2]].tolist() == [1767225600, -1] and valid.tolist() == [True, False, True]
    got, valid = epoch_seconds(pa.array([1767225600.0, float("nan"), None]), "s", "x")
    assert got[0] == 1767225600 and valid.tolist() == [True, False, False]
    with pytest.raises(InputError, match="non-integral"):
        epoch_seconds(pa.array([1.5]), "s", "x")


def test_epoch_seconds_rejects_strings():
    with pytest.raises(InputError, match=r"events.csv: column 'ts': time column must be .* got string"):
        epoch_seconds(pa.array(["2026-01-01"]), "s", "events.csv: column 'ts'")


def test_dictionary_columns_stay_encoded_and_count_like_plain_ones():
    spec = AttributeSpec("shop")
    arr = pa.array(["b", None, "a", "b", "c"])
    d = attribute_values(spec, arr.dictionary_encode())
    assert pa.types.is_dictionary(d.type)
    c1, c2 = ValueCounter(), ValueCounter()
    c1.update(d)
    c2.update(attribute_values(spec, arr))
    v1, v2 = Vocab.from_counts(*c1.result()), Vocab.from_counts(*c2.result())
    assert v1.values.equals(v2.values) and v1.values.type == pa.string()
    np.testing.assert_array_equal(v1.encode(d), v2.encode(arr))
