"""Property test over random small tables *and schemas*: the tokenizer equals the reference.

tests/test_tokenizer_property.py draws random logs for one fixed schema.  Here hypothesis also
draws the schema and the file: one to three attributes of any kind (strings with non-ASCII
values, integers of any width, booleans, floats used as categories, bucketed numbers, @hour and
@weekday), min_count and max_vocab, string and integer user ids, the time as an Arrow timestamp
or an integer epoch, the word rule (daily, session, one action per word) and position unit, the
cap or split of long words, window edges given or left to the data,
and the file format (Parquet with plain or dictionary strings, CSV, Arrow IPC).  The shards must
equal tokenizer/reference.py's words, vocabularies and dropped counts.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections import Counter

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenizer import reference, shards
from tokenizer.io import InputError
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import open_tokenized

T0 = 1774742400  # 2026-03-29T00:00:00Z: Berlin's spring switch is at 01:00 UTC that day
ZONES = ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/Sao_Paulo"]
INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint16(), pa.uint32(), pa.uint64()]


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


@st.composite
def attribute(draw, k: int):
    kind = draw(st.sampled_from(["str", "int", "bool", "float", "bucket", "@hour", "@weekday"]))
    a = {"name": f"a{k}", "kind": kind, "min_count": draw(st.integers(1, 3)),
         "max_vocab": draw(st.sampled_from([None, None, 3, 4, 6]))}
    if kind == "str":
        a["pool"] = draw(st.lists(st.text("abé日 ,\"x", min_size=1, max_size=4), min_size=1, max_size=6, unique=True))
        a["dictionary"] = draw(st.booleans())
    elif kind == "int":
        a["type"] = draw(st.sampled_from(INT_TYPES))
        a["pool"] = draw(st.lists(st.integers(0, 120), min_size=1, max_size=6, unique=True))
    elif kind == "float":
        a["pool"] = draw(st.lists(st.sampled_from([0.5, 1.5, 2.0, 3.25, -4.0, 7.0]), min_size=1, max_size=4,
                                  unique=True))
    elif kind == "bucket":
        a["buckets"] = sorted(draw(st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True)))
    return a


@st.composite
def cases(draw):
    tz = draw(st.sampled_from(ZONES))
    attrs = [draw(attribute(k)) for k in range(draw(st.integers(1, 3)))]
    string_users = draw(st.booleans())
    users = [f"ü{i}" for i in range(6)] if string_users else [i * 7_919 for i in range(6)]
    n = draw(st.integers(1, 50))
    rows = []
    t = T0 - 86400
    for _ in range(n):
        step = draw(st.sampled_from(["small", "gap", "day", "same", "repeat"]))
        if step == "repeat" and rows:
            rows.append(dict(draw(st.sampled_from(rows))))
            continue
        t += {"small": draw(st.integers(0, 1200)), "gap": 1800 + draw(st.integers(-1, 1)),
              "day": draw(st.integers(3 * 3600, 30 * 3600)), "same": 0, "repeat": 0}[step]
        r = {"user": None if draw(st.integers(0, 25)) == 0 else draw(st.sampled_from(users)),
             "t_us": None if draw(st.integers(0, 25)) == 0 else t * 1_000_000 + draw(st.sampled_from([0, 250_000]))}
        for a in attrs:
            if a["kind"] in ("@hour", "@weekday"):
                continue
            if draw(st.integers(0, 8)) == 0:
                r[a["name"]] = None
            elif a["kind"] == "bool":
                r[a["name"]] = draw(st.booleans())
            elif a["kind"] == "bucket":
                r[a["name"]] = draw(st.integers(-60, 60))
            else:
                r[a["name"]] = draw(st.sampled_from(a["pool"]))
        rows.append(r)
    ts = sorted(r["t_us"] // 1_000_000 for r in rows if r["t_us"] is not None) or [T0]
    # Window edges: given (cutting into the data, so some rows are outside) or left to the data.
    start = draw(st.sampled_from([None, ts[0] - 3600, ts[len(ts) // 3]]))
    end = draw(st.sampled_from([None, ts[-1] + 3600, ts[2 * len(ts) // 3] + 1]))
    if start is not None and end is not None and end <= start:
        end = start + 3600
    return {
        "tz": tz, "attrs": attrs, "rows": rows, "string_users": string_users, "window": (start, end),
        "rule": draw(st.sampled_from([("daily", "day"), ("session", "hour"), ("session", "day"), ("action", "hour"),
                                      ("action", "day")])),
        "overflow": draw(st.sampled_from(["cap", "split"])),
        "time": draw(st.sampled_from(["timestamp", "ms", "s"])),
        "fmt": draw(st.sampled_from(["parquet", "csv", "ipc"])),
        "max_words": draw(st.integers(1, 4)), "cap": draw(st.integers(1, 4)),
    }


def _column(a: dict, values: list) -> pa.Array:
    if a["kind"] == "str":
        arr = pa.array(values, pa.string())
        return arr.dictionary_encode() if a["dictionary"] else arr
    if a["kind"] == "int":
        return pa.array(values, a["type"])
    if a["kind"] == "bool":
        return pa.array(values, pa.bool_())
    return pa.array(values, pa.float64() if a["kind"] == "float" else pa.int64())


def _write(root, case) -> str:
    rows = case["rows"]
    cols = {"user": pa.array([r["user"] for r in rows], pa.string() if case["string_users"] else pa.int64())}
    t = [r["t_us"] for r in rows]
    if case["time"] == "timestamp":
        cols["ts"] = pa.array(t, pa.timestamp("us", tz="UTC"))
    else:
        per = {"ms": 1_000, "s": 1_000_000}[case["time"]]
        cols["ts"] = pa.array([None if v is None else v // per for v in t], pa.int64())
    for a in case["attrs"]:
        if a["kind"] not in ("@hour", "@weekday"):
            cols[a["name"]] = _column(a, [r[a["name"]] for r in rows])
    table = pa.table(cols)
    if case["fmt"] == "parquet":
        pq.write_table(table, root / "ev.parquet", row_group_size=max(1, len(rows) // 3))
        return "ev.parquet"
    if case["fmt"] == "ipc":
        feather.write_feather(table, root / "ev.arrow", compression="uncompressed", chunksize=max(1, len(rows) // 3))
        return "ev.arrow"
    pacsv.write_csv(table, root / "ev.csv")
    return "ev.csv"


def _local(t: int, tz: str) -> str:
    return dt.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(tz)).replace(tzinfo=None).isoformat()


def _resolved(case, seg_rows) -> tuple[int, int] | None:
    """The window the reference implies: given edges, or the local day / hour of the first or last
    time among the rows with a user and a time inside the given edges (docs/FORMATS.md §2)."""
    start, end = case["window"]
    tz = zoneinfo.ZoneInfo(case["tz"])
    ts = [r["t_us"] // 1_000_000 for r in seg_rows if r["user"] is not None and r["t_us"] is not None]
    ts = [x for x in ts if (start is None or x >= start) and (end is None or x < end)]
    if not ts:
        return None

    def floor(x: int) -> int:
        if case["rule"][1] == "hour":
            return x - x % 3600
        local = dt.datetime.fromtimestamp(x, tz).replace(tzinfo=None)
        day = local.replace(hour=4, minute=0, second=0, microsecond=0)
        day -= dt.timedelta(days=1) if day > local else dt.timedelta(0)
        return int(day.replace(tzinfo=tz).timestamp())

    def after(x0: int) -> int:
        if case["rule"][1] == "hour":
            return x0 + 3600
        nxt = dt.datetime.fromtimestamp(x0, tz).replace(tzinfo=None) + dt.timedelta(days=1)
        return int(nxt.replace(tzinfo=tz).timestamp())

    return (start if start is not None else floor(min(ts)), end if end is not None else after(floor(max(ts))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(), st.integers(1, 7), st.sampled_from([1, 2]))
def test_random_schemas_equal_the_reference(tmp_path_factory, case, batch_rows, workers):
    root = tmp_path_factory.mktemp("s")
    path = _write(root, case)
    start, end = case["window"]
    attrs = []
    for a in case["attrs"]:
        spec = {"name": a["name"], "min_count": a["min_count"]}
        if a["max_vocab"] is not None:
            spec["max_vocab"] = a["max_vocab"]
        if a["kind"] in ("@hour", "@weekday"):
            spec["column"] = a["kind"]
        if a["kind"] == "bucket":
            spec["buckets"] = a["buckets"]
        attrs.append(spec)
    data = {"timezone": case["tz"]}
    if start is not None:
        data["window_start"] = _local(start, case["tz"])
    if end is not None:
        data["window_end"] = _local(end, case["tz"])
    seg = {"path": path, "user_column": "user", "time_column": "ts", "word_rule": case["rule"][0],
           "position_unit": case["rule"][1], "max_words": case["max_words"], "max_actions_per_word": case["cap"],
           "word_overflow": case["overflow"], "attributes": attrs}
    if case["time"] != "timestamp":
        seg["time_unit"] = case["time"]
    schema = schema_from_dict({"data": data, "segments": {"ev": seg}}, root)

    rows = []
    for r in case["rows"]:
        r = dict(r)
        if case["time"] == "s" and r["t_us"] is not None:
            r["t_us"] = r["t_us"] // 1_000_000 * 1_000_000  # whole seconds on file
        elif case["time"] == "ms" and r["t_us"] is not None:
            r["t_us"] = r["t_us"] // 1_000 * 1_000
        rows.append(r)
    window = _resolved(case, rows)
    run = dict(progress=False, batch_rows=batch_rows, workers=workers, task_rows=max(1, len(rows) // 2))
    edges = ["given" if e is not None else "open" for e in case["window"]]
    event(f"format {case['fmt']}, time {case['time']}, window {edges}")
    if window is None:  # nothing inside the window: the run fails loudly
        event("no event kept")
        with pytest.raises(InputError, match="no event was kept"):
            tokenize(schema, root / "tok", **run)
        return
    ref_attrs = [{"name": a["name"], "column": a["kind"] if a["kind"].startswith("@") else a["name"],
                  "min_count": a["min_count"], "max_vocab": a["max_vocab"], "buckets": a.get("buckets")}
                 for a in case["attrs"]]
    expected, vocabs, dropped = reference.segment_reference(
        rows, user="user", time="t_us", attributes=ref_attrs, window=window, timezone=case["tz"],
        rule=case["rule"][0], position_unit=case["rule"][1], max_words=case["max_words"],
        max_actions_per_word=case["cap"], word_overflow=case["overflow"])
    m = tokenize(schema, root / "tok", **run)
    out = open_tokenized(root / "tok", verify=True)
    event("compared with the reference")
    assert reference.decoded_words(out, "ev") == expected
    for a in case["attrs"]:
        assert out.vocab("ev", a["name"]).to_pylist() == vocabs[a["name"]]
    assert Counter({k: v for k, v in m["dropped"]["ev"].items() if v}) == dropped
    assert (m["schema"]["segments"]["ev"]["window_start"], m["schema"]["segments"]["ev"]["window_end"]) == (
        _local(window[0], case["tz"]), _local(window[1], case["tz"]))
