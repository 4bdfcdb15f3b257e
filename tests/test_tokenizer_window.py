"""Windows taken from the data, and runs that would otherwise drop everything quietly.

- ``window_end`` and ``window_start`` may be left out: the tokenizer resolves them from the first
  and last event (the local day, or hour, that holds them) in the pass that reads the data, and
  the manifest records the resolved window; the words equal those of a run given that window.
- A run that keeps no event fails and names the likely cause (a time unit off by 1000, the zone);
  a segment that loses most rows to one reason, or most actions to the per-word cap, warns.
- A uint64 id past int64 is an error naming the file, the row and the column.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli.main import main
from tokenizer import reference, shards
from tokenizer.io import InputError
from tokenizer.pipeline import tokenize
from tokenizer.schema import schema_from_dict
from tokenizer.shards import open_tokenized

TZ = "Asia/Tokyo"  # UTC+9: local days start at 19:00 UTC the day before (04:00 local)
T0 = 1767225600  # 2026-01-01T00:00:00Z


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


def _events(tmp_path, n=3000, seed=0, scale=1000):
    rng = np.random.default_rng(seed)
    t = T0 + 5 * 86400 + rng.integers(0, 40 * 86400, n)
    rows = {"uid": rng.integers(0, 60, n), "t": t * scale, "item": rng.integers(0, 50, n)}
    pq.write_table(pa.table(rows), tmp_path / "ev.parquet", row_group_size=700)
    return rows, t


def _schema(tmp_path, data, unit="day", rule="daily", time_unit="ms", **seg):
    return schema_from_dict({"data": {"timezone": TZ, **data}, "segments": {"ev": {
        "path": "ev.parquet", "user_column": "uid", "time_column": "t", "time_unit": time_unit, "word_rule": rule,
        "position_unit": unit, "attributes": [{"name": "item"}], **seg}}}, tmp_path)


@pytest.mark.parametrize("unit,rule", [("day", "daily"), ("hour", "session")])
@pytest.mark.parametrize("given", ["none", "start", "end"])
def test_open_window_edges_are_resolved_from_the_data(tmp_path, unit, rule, given):
    _, t = _events(tmp_path)
    # The window the data implies: the local 04:00 day (or the hour) of the first event, to the end
    # of the day (or hour) of the last event.  Tokyo has no DST, so a day is 86400 s.
    if unit == "day":
        start = (int(t.min()) + 9 * 3600 - 4 * 3600) // 86400 * 86400 - 9 * 3600 + 4 * 3600
        end = (int(t.max()) + 9 * 3600 - 4 * 3600) // 86400 * 86400 - 9 * 3600 + 4 * 3600 + 86400
    else:
        start, end = int(t.min()) // 3600 * 3600, int(t.max()) // 3600 * 3600 + 3600

    def local(x):  # ISO wall-clock time in Tokyo
        import datetime as dt
        import zoneinfo
        return dt.datetime.fromtimestamp(x, zoneinfo.ZoneInfo(TZ)).replace(tzinfo=None).isoformat()

    explicit = tokenize(_schema(tmp_path, {"window_start": local(start), "window_end": local(end)}, unit, rule),
                        tmp_path / "explicit", progress=False)
    data = {"start": {"window_start": local(start)}, "end": {"window_end": local(end)}, "none": {}}[given]
    m = tokenize(_schema(tmp_path, data, unit, rule), tmp_path / "open", progress=False)
    seg = m["schema"]["segments"]["ev"]
    assert (seg["window_start"], seg["window_end"]) == (local(start), local(end))  # the resolved window, recorded
    assert m["segments"]["ev"]["window_from_data"] == {"none": ["window_start", "window_end"],
                                                       "start": ["window_end"], "end": ["window_start"]}[given]
    assert m["segments"]["ev"]["num_positions"] == explicit["segments"]["ev"]["num_positions"]
    assert m["counts"] == explicit["counts"] and not any(m["dropped"]["ev"].values())
    for name in ("ev",):
        a, b = open_tokenized(tmp_path / "open"), open_tokenized(tmp_path / "explicit")
        assert reference.decoded_words(a, name) == reference.decoded_words(b, name)
    assert min(p for _, words in reference.decoded_words(a, "ev").items() for p, _ in words) == 0


def test_open_end_still_drops_events_before_a_given_start(tmp_path):
    _, t = _events(tmp_path)
    cut = int(np.sort(t)[1000])
    import datetime as dt
    import zoneinfo
    start = dt.datetime.fromtimestamp(cut // 3600 * 3600, zoneinfo.ZoneInfo(TZ)).replace(tzinfo=None).isoformat()
    m = tokenize(_schema(tmp_path, {"window_start": start}, "hour", "session"), tmp_path / "tok", progress=False)
    assert m["dropped"]["ev"]["outside_window"] == int((t < cut // 3600 * 3600).sum())
    assert m["schema"]["segments"]["ev"]["window_start"] == start


def test_open_window_that_the_data_stretches_past_68_years_is_an_error(tmp_path):
    pq.write_table(pa.table({"uid": [1, 2], "t": [0, 2_500_000_000_000], "item": [1, 2]}), tmp_path / "ev.parquet")
    with pytest.raises(InputError, match=r"segment 'ev': events run from 1970-01-01T00:00:00Z to 2049.*68 years.*"
                                         r"window_start and window_end"):
        tokenize(_schema(tmp_path, {}), tmp_path / "tok", progress=False)


def test_every_event_outside_the_window_fails_and_names_the_time_unit(tmp_path):
    """Times in seconds, read as milliseconds, all land in January 1970: the run fails, says so,
    and says which unit would put them in the window."""
    _events(tmp_path, scale=1)  # seconds, but the schema says ms
    window = {"window_start": "2026-01-01T00:00:00", "window_end": "2026-03-01T00:00:00"}
    with pytest.raises(InputError, match=r"no event was kept:\n  segment 'ev': none of its 3,000 rows was kept "
                                         r"\(3,000 dropped as time outside the segment window\).*1970-01-.*"
                                         r'read as epoch s they fall in the window \(time_unit = "s"; the schema '
                                         r'says "ms"\)'):
        tokenize(_schema(tmp_path, window), tmp_path / "tok", progress=False)
    # The command exits non-zero with the same message, and writes no manifest.
    (tmp_path / "schema.toml").write_text(_schema(tmp_path, window).to_toml())
    assert main(["tokenize", "--schema", str(tmp_path / "schema.toml"), "--out", str(tmp_path / "cli"), "-q"]) != 0
    assert not (tmp_path / "cli" / "manifest.json").exists()


def test_most_rows_dropped_for_one_reason_warns_in_the_manifest_and_summary(tmp_path, capsys):
    rows, t = _events(tmp_path)
    # A window that holds a fifth of the events: most rows fall outside it.
    import datetime as dt
    cut = int(np.quantile(t, 0.2))
    end = dt.datetime.fromtimestamp(cut // 3600 * 3600, dt.UTC).replace(tzinfo=None).isoformat()
    schema = _schema(tmp_path, {"window_start": "2026-01-01T09:00:00", "window_end": end})
    m = tokenize(schema, tmp_path / "tok", progress=False)
    (w,) = m["warnings"]
    n = m["dropped"]["ev"]["outside_window"]
    assert n > 0.5 * 3000 and w.startswith(f"segment 'ev': {n:,} of 3,000 rows ({n / 3000:.0%}) dropped as time "
                                           "outside the segment window: the window is [")
    (tmp_path / "schema.toml").write_text(schema.to_toml())
    capsys.readouterr()
    assert main(["tokenize", "--schema", str(tmp_path / "schema.toml"), "--out", str(tmp_path / "cli"), "-q"]) == 0
    out = capsys.readouterr()
    assert "WARNING" in out.out + out.err and w in out.out + out.err


def test_per_word_cap_that_drops_many_actions_warns_and_names_the_knob(tmp_path):
    _events(tmp_path)
    m = tokenize(_schema(tmp_path, {}, max_actions_per_word=1), tmp_path / "tok", progress=False)
    capped, events = m["counts"]["ev"]["actions_capped"], m["counts"]["ev"]["events"]
    assert capped > 0.05 * events
    assert m["warnings"] == [f"segment 'ev': max_actions_per_word = 1 dropped {capped:,} of {events:,} events "
                             f"({capped / events:.0%}); set word_overflow = \"split\" to cut long words into "
                             "several instead (bursty logs), or raise max_actions_per_word"]
    ok = tokenize(_schema(tmp_path, {}), tmp_path / "tok2", progress=False)
    assert "warnings" not in ok
    # Split: the same events, none dropped, in more words of at most one action each.
    split = tokenize(_schema(tmp_path, {}, max_actions_per_word=1, word_overflow="split"), tmp_path / "tok3",
                     progress=False)
    assert "warnings" not in split and split["counts"]["ev"]["actions_capped"] == 0
    assert split["counts"]["ev"]["actions"] == events
    assert split["counts"]["ev"]["words"] == m["counts"]["ev"]["words"] + capped


@pytest.mark.parametrize("column", ["uid", "item"])
def test_uint64_past_int64_names_file_row_and_column(tmp_path, column):
    n = 1000
    values = {"uid": np.arange(n, dtype=np.uint64), "t": np.full(n, (T0 + 86400) * 1000, np.int64),
              "item": np.arange(n, dtype=np.uint64)}
    values[column][637] = np.uint64(2**63 + 5)
    pq.write_table(pa.table(values), tmp_path / "ev.parquet", row_group_size=300)
    with pytest.raises(InputError, match=rf"ev.parquet: row 637 \(0-based\): column '{column}' holds "
                                         rf"{2**63 + 5}, beyond the int64 range"):
        tokenize(_schema(tmp_path, {}), tmp_path / "tok", progress=False, batch_rows=256)
    # Values within int64 are fine as uint64.
    values[column][637] = 637
    pq.write_table(pa.table(values), tmp_path / "ev.parquet")
    m = tokenize(_schema(tmp_path, {}), tmp_path / "tok", progress=False)
    assert m["counts"]["users"] == n
    json.dumps(m)
