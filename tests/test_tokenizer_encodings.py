"""The same events in every column encoding and file format a user has give byte-identical output.

Realistic logs (tokenizer.synthetic.realistic.py: one table routed to two segments, Zipf catalogues with
far more distinct values per batch than the plain-string dictionary threshold, heavy users, rows in
arbitrary order over several files and row groups) are written as Parquet with plain, Arrow
dictionary, large_string and string_view columns, Parquet with int32 ids, CSV, and Arrow IPC
(plain and dictionary).  Every variant must give the same shard bytes, vocabulary bytes and
manifest (but for the input path and the CSV's time unit), and the words must equal the
pure-Python reference's.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenizer import reference, shards
from tokenizer.io import file_schema
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic.realistic import LogShape, write_logs

SHAPE = LogShape(events=24_000, users=300, items=100_000, shops=20_000, genres=500, queries=8_000, files=3,
                 row_group_rows=3_000, string_ids=True, seed=7)
VARIANTS = {
    "parquet-plain": dict(fmt="parquet", encoding="plain"),
    "parquet-dictionary": dict(fmt="parquet", encoding="dictionary"),
    "parquet-large_string": dict(fmt="parquet", encoding="large"),
    "parquet-string_view": dict(fmt="parquet", encoding="view"),
    "csv": dict(fmt="csv"),
    "ipc-plain": dict(fmt="ipc", encoding="plain"),
    "ipc-dictionary": dict(fmt="ipc", encoding="dictionary"),
}


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


def _digest(tok):
    """(manifest without the input-specific schema keys, sha256 of every output file)."""
    m = json.loads((tok / "manifest.json").read_text())
    for seg in m["schema"]["segments"].values():
        seg.pop("path")
        seg.pop("time_unit")
    files = {str(p.relative_to(tok)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(tok.rglob("*.arrow"))}
    return m, files


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        root = write_logs(tmp_path_factory.mktemp(name), SHAPE, **kw)
        # Small batches: many batches per file, each with thousands of distinct items.
        tokenize(load_schema(root / "schema.toml"), root / "tok", progress=False, batch_rows=5_000, workers=2,
                 shard_users=100)
        out[name] = root
    return out


def test_string_columns_are_encoded_as_asked(outputs):
    types = {name: file_schema(next((root / "events").iterdir())).field("item_id").type
             for name, root in outputs.items()}
    assert types["parquet-dictionary"] == pa.dictionary(pa.int32(), pa.string())
    assert types["parquet-large_string"] == pa.large_string()
    assert types["ipc-dictionary"] == pa.dictionary(pa.int32(), pa.string())
    assert types["parquet-string_view"] in (pa.string_view(), pa.string())  # Parquet may not keep the view type
    assert types["csv"] == pa.string() and types["parquet-plain"] == pa.string()


@pytest.mark.parametrize("name", [v for v in VARIANTS if v != "parquet-plain"])
def test_every_encoding_gives_identical_output(outputs, name):
    base_m, base_files = _digest(outputs["parquet-plain"] / "tok")
    m, files = _digest(outputs[name] / "tok")
    assert files == base_files
    assert m == base_m


def test_int32_and_int64_ids_give_identical_output(tmp_path):
    shape = LogShape(**{**SHAPE.__dict__, "string_ids": False})
    digests = []
    for width in (64, 32):
        root = write_logs(tmp_path / f"i{width}", shape, int_width=width)
        tokenize(load_schema(root / "schema.toml"), root / "tok", progress=False, batch_rows=5_000)
        digests.append(_digest(root / "tok"))
        assert file_schema(next((root / "events").iterdir())).field("item_id").type == (
            pa.int32() if width == 32 else pa.int64())
    assert digests[0] == digests[1]


def test_realistic_words_equal_the_reference(outputs):
    """The shards of the realistic log equal the pure-Python reference's, segment by segment."""
    root = outputs["parquet-plain"]
    schema = load_schema(root / "schema.toml")
    table = pq.read_table(root / "events")
    rows = table.to_pylist()
    for r in rows:
        r["ts"] = int(r["ts"].timestamp() * 1_000_000)  # UTC microseconds, as the reference takes them
    data = open_tokenized(root / "tok", verify=True)
    m = json.loads((root / "tok" / "manifest.json").read_text())
    for name, seg in schema.segments.items():
        mine = [r for r in rows if r["event_type"] in seg.segment_values]
        attrs = [{"name": a.name, "column": a.column, "min_count": a.min_count, "max_vocab": a.max_vocab,
                  "buckets": a.buckets} for a in seg.attributes]
        expected, vocabs, dropped = reference.segment_reference(
            mine, user="user_id", time="ts", attributes=attrs, window=schema.window_seconds(seg),
            timezone=schema.data.timezone, rule=seg.word_rule, position_unit=seg.position_unit,
            day_start_hour=seg.day_start_hour, gap_minutes=seg.gap_minutes, max_words=seg.max_words,
            max_actions_per_word=seg.max_actions_per_word)
        assert reference.decoded_words(data, name) == expected
        for a in attrs:
            assert data.vocab(name, a["name"]).to_pylist() == vocabs[a["name"]]
        assert Counter({k: v for k, v in m["dropped"][name].items() if v}) == dropped
