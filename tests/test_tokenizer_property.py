"""Property tests: the whole tokenizer equals the pure-Python reference on random logs.

Hypothesis draws small logs that hit the edges on purpose: times on the 04:00 day boundary and
around DST switches, gaps of exactly the session gap, equal timestamps, repeated events, nulls,
rows outside the window, and users in several files.  Each log is tokenized with random batch
sizes (chunk boundaries anywhere), reading tasks, workers, shard sizes and spill modes, and
the shards must equal tokenizer/reference.py exactly: users and their order, every word's
position, and every action's attribute values, and the counts must add up.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import reference, shards
from tokenizer.io import InputError
from tokenizer.manifest import check_accounting
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import open_tokenized


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    """Atomic renames without fsync: these tests need atomicity, not power-loss durability."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


ZONES = ["Europe/Berlin", "Asia/Tokyo", "America/Sao_Paulo", "UTC"]
WINDOW = ("2026-03-26T00:00:00", "2026-04-02T00:00:00")  # Berlin's spring switch is on 2026-03-29


def _utc(local: str, tz: str) -> int:
    return int(dt.datetime.fromisoformat(local).replace(tzinfo=zoneinfo.ZoneInfo(tz)).timestamp())


@st.composite
def logs(draw):
    tz = draw(st.sampled_from(ZONES))
    ws, we = _utc(WINDOW[0], tz), _utc(WINDOW[1], tz)
    string_ids = draw(st.booleans())
    pool = [f"u{i}" for i in range(8)] if string_ids else [i * 1_000_003 for i in range(8)]
    # Anchors: the 04:00 boundary of each day, the DST switch instants, the window edges.
    anchors = [_utc(f"2026-03-{d:02d}T04:00:00", tz) for d in range(26, 32)]
    anchors += [1774746000, 1774749600, ws, we - 1, we]
    n = draw(st.integers(0, 70))
    rows, t = [], ws + 3600
    for _ in range(n):
        kind = draw(st.sampled_from(["step", "anchor", "same", "gap", "far", "repeat"]))
        if kind == "repeat" and rows:
            rows.append(dict(draw(st.sampled_from(rows))))
            continue
        if kind == "anchor":
            t = draw(st.sampled_from(anchors)) + draw(st.sampled_from([-1, 0, 1]))
        elif kind == "gap":
            t += 1800 + draw(st.sampled_from([-1, 0, 1]))
        elif kind == "far":
            t = draw(st.integers(ws - 86400, we + 86400))
        elif kind == "step":
            t += draw(st.integers(0, 20000))
        rows.append({
            "user": None if draw(st.integers(0, 30)) == 0 else draw(st.sampled_from(pool)),
            "ts": None if draw(st.integers(0, 30)) == 0 else t * 1000 + draw(st.sampled_from([0, 0, 999])),
            "kind": draw(st.sampled_from(["view", "buy", "cart", None])),
            "shop": draw(st.integers(0, 6)),
        })
    return tz, string_ids, rows


def _write(root: Path, rows: list[dict], string_ids: bool, n_files: int, group: int) -> None:
    (root / "ev").mkdir(parents=True)
    types = {"user": pa.string() if string_ids else pa.int64(), "ts": pa.int64(), "kind": pa.string(),
             "shop": pa.int64()}
    bounds = [len(rows) * i // n_files for i in range(n_files + 1)]
    for f in range(n_files):
        part = rows[bounds[f] : bounds[f + 1]]
        table = pa.table({c: pa.array([r[c] for r in part], t) for c, t in types.items()})
        pq.write_table(table, root / "ev" / f"part-{f}.parquet", row_group_size=max(1, group))


def _expected(rows, tz, seg):
    ws, we = _utc(WINDOW[0], tz), _utc(WINDOW[1], tz)
    dropped = Counter()
    good = []
    for r in rows:
        if r["user"] is None:
            dropped["null_user"] += 1
        elif r["ts"] is None:
            dropped["null_time"] += 1
        elif not ws <= r["ts"] // 1000 < we:
            dropped["outside_window"] += 1
        else:
            good.append(r)
    hours = [reference.hour_of_day(r["ts"] // 1000, tz) for r in good]
    vocabs = {
        "kind": reference.vocabulary([r["kind"] for r in good]),
        "shop": reference.vocabulary([r["shop"] for r in good], min_count=2),
        "hour": reference.vocabulary(hours),
    }
    kept, dropped["duplicate"] = reference.drop_duplicates(good, ["user", "ts", "kind", "shop"])
    words = reference.all_words(
        [r["user"] for r in kept], [r["ts"] // 1000 for r in kept], rule=seg["word_rule"],
        position_unit=seg["position_unit"], timezone=tz, window_start_utc=ws, gap_minutes=30.0,
        max_words=seg["max_words"], max_actions_per_word=seg["max_actions_per_word"],
    )

    def known(attr, value):  # what the vocabulary keeps of a value: itself, or unknown (None)
        return value if value in vocabs[attr] else None

    values = {
        u: [(pos, [(known("kind", kept[i]["kind"]), known("shop", kept[i]["shop"]),
                    known("hour", reference.hour_of_day(kept[i]["ts"] // 1000, tz))) for i in idx])
            for pos, idx in ws_]
        for u, ws_ in words.items()
    }
    return values, vocabs, dropped


@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    logs(),
    st.sampled_from([("daily", "day"), ("session", "hour"), ("session", "day")]),
    st.integers(1, 3), st.integers(1, 3),
    st.integers(1, 40), st.integers(1, 3), st.integers(1, 20), st.sampled_from([1, 2]),
    st.sampled_from(["memory", "disk"]), st.integers(1, 9),
)
def test_tokenizer_equals_reference(tmp_path_factory, log, rule, max_words, cap, batch_rows, n_files, group,
                                    workers, spill, shard_users):
    tz, string_ids, rows = log
    root = tmp_path_factory.mktemp("p")
    _write(root, rows, string_ids, n_files, group)
    seg = {"path": "ev", "user_column": "user", "time_column": "ts", "time_unit": "ms",
           "word_rule": rule[0], "position_unit": rule[1], "max_words": max_words, "max_actions_per_word": cap,
           "attributes": [{"name": "kind"}, {"name": "shop", "min_count": 2}, {"name": "hour", "column": "@hour"}]}
    schema = schema_from_dict({"data": {"window_start": WINDOW[0], "window_end": WINDOW[1], "timezone": tz},
                               "segments": {"ev": seg}}, root)
    values, vocabs, dropped = _expected(rows, tz, seg)
    run = dict(progress=False, batch_rows=batch_rows, task_rows=max(1, len(rows) // 2), workers=workers, spill=spill,
               shard_users=shard_users)
    if rows and sum(dropped.values()) - dropped["duplicate"] == len(rows):
        with pytest.raises(InputError, match="no event was kept"):  # a run that keeps nothing fails loudly
            tokenize(schema, root / "tok", **run)
        return
    m = tokenize(schema, root / "tok", **run)
    data = open_tokenized(root / "tok", verify=True)
    bits = m["sharding"]["shard_bits"]
    assert data.user_ids.to_pylist() == reference.user_order(values, bits)
    assert reference.decoded_words(data, "ev") == values
    for a, v in vocabs.items():
        assert data.vocab("ev", a).to_pylist() == v
    assert {k: v for k, v in m["dropped"]["ev"].items() if v} == {k: v for k, v in dropped.items() if v}
    assert check_accounting(m) == []
    assert m["counts"]["events_read"] == len(rows)
