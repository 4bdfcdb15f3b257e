"""High-cardinality attributes: a plain string column with many more distinct values than one
read batch's dictionary threshold (the crash of issue 13: dictionary-encoding a dictionary again,
without end), and the same values given as dictionary-encoded, large_string and integer columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenizer import reference, shards
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import open_tokenized

WS_MS = 1609459200000  # 2021-01-01T00:00:00Z
DATA = {"window_start": "2021-01-01T00:00:00", "window_end": "2021-02-01T00:00:00", "timezone": "UTC"}


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


def _schema(tmp_path, path="ev.parquet"):
    return schema_from_dict({"data": DATA, "segments": {"long": {
        "path": path, "user_column": "user_id", "time_column": "ts", "word_rule": "daily", "position_unit": "day",
        "attributes": [{"name": "item", "column": "item", "dim": 16}]}}}, tmp_path)


def test_plain_strings_with_100k_distinct_values_tokenize(tmp_path):
    """The issue's reproduction: 20,000 rows, ids drawn from 100,000 strings, one daily segment."""
    rng = np.random.default_rng(0)
    n = 20_000
    items = rng.integers(0, 100_000, n)
    table = pa.table({
        "user_id": rng.integers(0, 500, n),
        "ts": pa.array(WS_MS + rng.integers(0, 86400000 * 30, n)).cast(pa.timestamp("ms", tz="UTC")),
        "item": [f"item{i}" for i in items]})
    pq.write_table(table, tmp_path / "ev.parquet")
    m = tokenize(_schema(tmp_path), tmp_path / "tok", progress=False, batch_rows=1 << 14)
    distinct = len(np.unique(items))
    assert m["segments"]["long"]["vocab_sizes"] == [distinct + 2]  # pad, unknown, every value seen
    data = open_tokenized(tmp_path / "tok")
    seg = data.segment("long")
    assert int(seg.user_action_offsets[-1]) == n
    # Every action's id decodes to its own value: compare with the pure-Python reference.
    rows = [{"user_id": u, "ts": t * 1000, "item": f"item{i}"}
            for u, t, i in zip(table["user_id"].to_pylist(), table["ts"].cast(pa.int64()).to_pylist(), items)]
    values, vocabs, dropped = reference.segment_reference(
        rows, user="user_id", time="ts", attributes=[{"name": "item", "column": "item"}],
        window=(WS_MS // 1000, WS_MS // 1000 + 31 * 86400), timezone="UTC", rule="daily", position_unit="day")
    assert reference.decoded_words(data, "long") == values
    assert data.vocab("long", "item").to_pylist() == vocabs["item"]
    assert not dropped
