"""Vocabularies: value codes counted per task and merged, cutoffs, ids, encoding, derived values."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from tokenizer import reference
from tokenizer.coders import Coder, build_vocab, ids_for_vocab, merge_codes
from tokenizer.io import InputError
from tokenizer.plan import KIND_FIXED, KIND_FLOAT, KIND_INT, KIND_STR, AttrPlan
from tokenizer.timecols import local_seconds
from tokenizer.vocab import Vocab, vocab_file


def count_in_tasks(values, kind, batch, n_tasks, dictionary=False, min_count=1, max_vocab=None):
    """Code values in n_tasks tasks (batches of `batch`), merge, and return (counts dict, vocab, ids)."""
    attr = AttrPlan("a", "a", kind, min_count=min_count, max_vocab=max_vocab)
    bounds = [len(values) * t // n_tasks for t in range(n_tasks + 1)]
    states, codes_per_task = [], []
    for t in range(n_tasks):
        coder = Coder(attr)
        task_codes = []
        for i in range(bounds[t], bounds[t + 1], batch):
            arr = pa.array(values[i : min(i + batch, bounds[t + 1])])
            if dictionary:
                arr = arr.dictionary_encode()
            codes, _ = coder.encode(arr, None)
            coder.count(codes.reshape(-1, 1), 0, np.ones(len(codes), bool))
            task_codes.append(codes)
        states.append(coder.state())
        codes_per_task.append(np.concatenate(task_codes) if task_codes else np.zeros(0, np.int32))
    g = merge_codes(attr, states)
    vocab, ids = build_vocab(g)
    # Every value's code, through its task's table and the vocabulary, gives its id.
    encoded = np.concatenate([ids[g.task_luts[t][c]] for t, c in enumerate(codes_per_task)]) if values else []
    counts = {v: int(n) for v, n in zip(g.values.to_pylist(), g.counts[1:]) if n}
    return counts, vocab, list(encoded)


@pytest.mark.parametrize("dictionary", [False, True])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_counts_merge_across_batches_and_tasks_and_ignore_nulls(dictionary, n_tasks):
    rng = np.random.default_rng(0)
    values = [None if rng.random() < 0.1 else f"v{int(rng.zipf(1.5)) % 50}" for _ in range(3000)]
    expected = Counter(v for v in values if v is not None)
    for batch in (1, 7, 1000, 5000):
        counts, _, _ = count_in_tasks(values, KIND_STR, batch, n_tasks, dictionary)
        assert counts == expected


@pytest.mark.parametrize("seed", range(4))
def test_vocab_and_ids_match_reference(seed):
    rng = np.random.default_rng(seed)
    kind = [KIND_INT, KIND_STR, KIND_FLOAT, KIND_STR][seed]
    raw = rng.zipf(1.3, 2000) % 200
    values = {KIND_INT: [int(x) for x in raw], KIND_STR: [f"s{x:03d}" for x in raw],
              KIND_FLOAT: [float(x) / 4 for x in raw]}[kind]
    values = [None if i % 97 == 0 else v for i, v in enumerate(values)]
    for min_count, max_vocab in ((1, None), (3, None), (1, 10), (5, 3), (2, 1000)):
        _, v, encoded = count_in_tasks(values, kind, 300, 2, min_count=min_count, max_vocab=max_vocab)
        expected = reference.vocabulary(values, min_count, max_vocab)
        assert v.values.to_pylist() == expected
        assert v.size == len(expected) + 2
        assert encoded == [reference.encode(x, expected) for x in values]
        if max_vocab is not None:
            assert v.size <= max_vocab


def test_a_given_vocabulary_keeps_its_ids_and_maps_new_values_to_unknown():
    given = Vocab.from_counts(pa.array(["x", "y", "z"]), np.array([5, 3, 1]))
    attr = AttrPlan("a", "a", KIND_STR)
    coder = Coder(attr, seed=given)
    codes, _ = coder.encode(pa.array(["y", "new", None, "x"]), None)
    assert codes.tolist() == [2, 4, 0, 1]  # seeded values first, in id order
    g = merge_codes(attr, [coder.state()], seed=given)
    ids = ids_for_vocab(g, given)
    assert ids[g.task_luts[0][codes]].tolist() == [3, 1, 1, 2]
    with pytest.raises(InputError, match="the given vocabulary holds int64"):
        Coder(attr, seed=Vocab.from_counts(pa.array([1, 2]), np.array([1, 1])))


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


def test_buckets_are_searchsorted_right():
    b = [18, 25, 35]
    coder = Coder(AttrPlan("age", "age", KIND_FIXED, buckets=b, domain=len(b) + 1))
    arr = pa.array([0, 17.9, 18, 24, 25, 34.5, 35, 99, None, float("nan")])
    codes, _ = coder.encode(arr, None)
    assert (codes - 1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, -1, -1]  # code 0: null
    assert (codes[:8] - 1).tolist() == [reference.bucket(x, b) for x in arr.to_pylist()[:8]]
    codes, _ = coder.encode(pa.array([30, None], pa.int32()), None)
    assert codes.tolist() == [3, 0]


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
    hours, _ = Coder(AttrPlan("h", None, KIND_FIXED, derived="@hour", domain=24)).encode(None, local)
    days, _ = Coder(AttrPlan("d", None, KIND_FIXED, derived="@weekday", domain=7)).encode(None, local)
    assert (hours - 1).tolist() == [reference.hour_of_day(x, tz) for x in t.tolist()]
    assert (days - 1).tolist() == [reference.weekday(x, tz) for x in t.tolist()]


def test_dictionary_columns_code_like_plain_ones_and_flag_bad_utf8():
    attr = AttrPlan("shop", "shop", KIND_STR)
    arr = pa.array(["b", None, "a", "b", "c"])
    c1, c2 = Coder(attr), Coder(attr)
    d1, _ = c1.encode(arr.dictionary_encode(), None)
    d2, _ = c2.encode(arr, None)
    assert c1.state()["data"].tobytes() == c2.state()["data"].tobytes()
    np.testing.assert_array_equal(d1, d2)
    raw = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(np.array([0, 1, 3, 4], np.int32)),
                                                 pa.py_buffer(b"a\xc3(b")])
    for col in (raw, raw.dictionary_encode()):
        _, bad = Coder(attr).encode(col, None)
        assert bad.tolist() == [False, True, False]
