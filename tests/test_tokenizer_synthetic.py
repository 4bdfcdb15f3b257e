"""The synthetic log generator: determinism, formats, schema, labels, and the planted signal."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tokenizer.schema import load_schema
from tokenizer.synthetic import generate
from tokenizer.synthetic.world import Categorical, zipf_weights

TZ = zoneinfo.ZoneInfo("Asia/Tokyo")
START = dt.datetime(2026, 1, 1, tzinfo=TZ)
END = START + dt.timedelta(days=90)
SHORT_START = END - dt.timedelta(days=7)
N_GENRES = 500  # a smaller world than the default, so a few thousand users see most of it


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _read(path: Path) -> pa.Table:
    return pq.read_table(path)


def _all_tables(out: Path) -> dict[str, pa.Table]:
    return {str(p.relative_to(out)): _read(p) for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_small")
    summary = generate(out, 3000, seed=11, chunk_users=1000, progress=False, n_genres=N_GENRES, n_shops=4000)
    return out, summary


@pytest.fixture(scope="module")
def signal(tmp_path_factory) -> tuple[Path, dict]:
    """Enough users for the downstream-signal checks (about 0.8M events, about a second)."""
    out = tmp_path_factory.mktemp("synth_signal")
    summary = generate(out, 12000, seed=5, chunk_users=4000, progress=False, n_genres=N_GENRES, n_shops=4000)
    return out, summary


# -- determinism -------------------------------------------------------------------------------
def test_same_seed_same_tables_and_progress_does_not_matter(tmp_path, capsys):
    kw = dict(chunk_users=400, n_genres=300, n_shops=1000)
    a = generate(tmp_path / "a", 1000, seed=3, progress=False, **kw)
    b = generate(tmp_path / "b", 1000, seed=3, progress=True, **kw)
    capsys.readouterr()
    ta, tb = _all_tables(tmp_path / "a"), _all_tables(tmp_path / "b")
    assert list(ta) == list(tb) and len(ta) >= 8  # 3 long + 3 short parts, users, 3 label files
    for name in ta:
        assert ta[name].equals(tb[name]), name
    assert (tmp_path / "a/schema.toml").read_text() == (tmp_path / "b/schema.toml").read_text()
    assert a["counts"] == b["counts"]

    generate(tmp_path / "c", 1000, seed=4, progress=False, **kw)
    tc = _all_tables(tmp_path / "c")
    for name in ("long/part-00000.parquet", "short/part-00000.parquet", "users.parquet"):
        assert not ta[name].equals(tc[name]), name


def test_rerun_with_fewer_users_removes_stale_parts(tmp_path):
    generate(tmp_path, 900, seed=0, chunk_users=300, progress=False, n_genres=100, n_shops=300)
    generate(tmp_path, 300, seed=0, chunk_users=300, progress=False, n_genres=100, n_shops=300)
    assert sorted(p.name for p in (tmp_path / "long").iterdir()) == ["part-00000.parquet"]


def test_categorical_sampler_is_the_inverse_cdf():
    rng = np.random.default_rng(0)
    for p in (zipf_weights(3000, 1.0), np.array([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]), np.ones(7)):
        u = np.concatenate([rng.random(100_000), [0.0, 0.5, 1.0 - 1e-16, 1.0]])
        cdf = np.cumsum(p) / np.sum(p)
        expected = np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)
        assert (Categorical(p)(u) == expected).all()


# -- layout, types and ranges ------------------------------------------------------------------
def test_layout_and_summary(small):
    out, s = small
    for f in ("users.parquet", "labels/targeting.parquet", "labels/is_parent.parquet",
              "labels/next_genre.parquet", "schema.toml", "SYNTH.json"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "long").iterdir()) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert sorted(p.name for p in (out / "short").iterdir()) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert pq.ParquetFile(out / "users.parquet").num_row_groups == 3  # streamed, one group per chunk
    long_t, short_t = _read(out / "long"), _read(out / "short")
    assert s["counts"]["long_events"] == long_t.num_rows
    assert s["counts"]["short_events"] == short_t.num_rows
    assert s["counts"]["events"] == long_t.num_rows + short_t.num_rows
    assert s["events_per_s"] > 0


def test_event_columns_types_and_windows(small):
    out, _ = small
    long_t, short_t = _read(out / "long"), _read(out / "short")
    ts_type = pa.timestamp("ms", tz="UTC")
    assert long_t.schema == pa.schema([("user_id", pa.int64()), ("ts", ts_type), ("action", pa.string()),
                                       ("channel", pa.string()), ("price", pa.float64()),
                                       ("shop", pa.int64()), ("genre", pa.string())])
    assert short_t.schema == pa.schema([("user_id", pa.int64()), ("ts", ts_type), ("action", pa.string()),
                                        ("shop", pa.int64()), ("genre", pa.string()),
                                        ("device", pa.string())])
    lt, st = long_t["ts"].cast(pa.int64()).to_numpy(), short_t["ts"].cast(pa.int64()).to_numpy()
    for t, ts in ((long_t, lt), (short_t, st)):  # written sorted by (user, time), users grouped
        uid = t["user_id"].to_numpy()
        same = uid[1:] == uid[:-1]
        assert (np.diff(ts)[same] >= 0).all()
        assert len(np.unique(uid)) == 1 + np.count_nonzero(~same)
    assert lt.min() >= _ms(START) and lt.max() < _ms(END)
    assert st.min() >= _ms(SHORT_START) and st.max() < _ms(END)
    assert lt.min() < _ms(START + dt.timedelta(days=7))  # the long window really is used from the start
    assert set(pc.unique(long_t["action"]).to_pylist()) == {"purchase", "point_use"}
    assert set(pc.unique(short_t["action"]).to_pylist()) == {"page_view", "click", "search"}
    assert set(pc.unique(long_t["channel"]).to_pylist()) <= {"app", "web", "store"}
    assert pc.min(long_t["price"]).as_py() > 0
    for t in (long_t, short_t):
        assert t.column("genre").null_count == 0 and t.column("shop").null_count == 0
        assert pc.all(pc.match_substring_regex(t["genre"], r"^g\d{4}$")).as_py()
        assert 0 <= pc.min(t["shop"]).as_py() and pc.max(t["shop"]).as_py() < 4000


def test_users_table(small):
    out, _ = small
    users = _read(out / "users.parquet")
    assert users.schema == pa.schema([("user_id", pa.int64()), ("gender", pa.string()),
                                      ("age", pa.int32()), ("region", pa.string())])
    ids = users["user_id"].to_numpy()
    assert len(np.unique(ids)) == len(ids) == 3000
    assert 0 < users["gender"].null_count < 0.2 * len(ids)  # some users do not say
    age = users["age"].drop_null().to_numpy()
    assert 16 <= age.min() and age.max() <= 85 and 25 < np.median(age) < 55
    assert set(pc.unique(users["gender"]).to_pylist()) == {"F", "M", None}
    for seg in ("long", "short"):
        assert np.isin(_read(out / seg)["user_id"].to_numpy(), ids).all()
    # Many users with few events, a few with many (heavy-tailed activity).
    n_events = np.unique(_read(out / "long")["user_id"].to_numpy(), return_counts=True)[1]
    assert np.percentile(n_events, 99) > 4 * np.median(n_events)


def test_sessions_and_daily_structure(small):
    out, _ = small
    short_t = _read(out / "short")
    uid, ts = short_t["user_id"].to_numpy(), short_t["ts"].cast(pa.int64()).to_numpy()
    same_user = uid[1:] == uid[:-1]
    gaps = np.diff(ts)[same_user]
    within = gaps <= 30 * 60 * 1000
    assert within.mean() > 0.7  # most consecutive events are inside a session ...
    assert (~within).sum() > 0.2 * len(np.unique(uid))  # ... and sessions are separated by idle gaps
    assert np.median(gaps[within]) < 5 * 60 * 1000  # seconds to a few minutes apart

    # Point usage happens on purchase days: right after a purchase by the same user, same shop.
    long_t = _read(out / "long")
    action = long_t["action"].to_numpy(zero_copy_only=False)
    luid, lts, shop = (long_t["user_id"].to_numpy(), long_t["ts"].cast(pa.int64()).to_numpy(),
                       long_t["shop"].to_numpy())
    pu = np.flatnonzero(action == "point_use")
    assert 0 < len(pu) < (action == "purchase").sum()
    prev = pu - 1
    assert (prev >= 0).all() and (luid[prev] == luid[pu]).all()
    assert (lts[pu] - lts[prev] <= 10 * 60 * 1000).mean() > 0.95
    assert (shop[prev] == shop[pu]).mean() > 0.95


def test_weekends_are_busier(small):
    out, _ = small
    ts = _read(out / "long")["ts"].cast(pa.int64()).to_numpy() // 1000
    local_day = (ts + 9 * 3600) // 86400  # Asia/Tokyo has no DST
    weekday = (local_day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    day0 = (_ms(START) // 1000 + 9 * 3600) // 86400
    days_per_weekday = np.bincount((np.arange(day0, day0 + 90) + 3) % 7, minlength=7)
    per_day = np.bincount(weekday, minlength=7) / days_per_weekday
    assert per_day[5:].mean() > 1.1 * per_day[:5].mean()


# -- schema ------------------------------------------------------------------------------------
def test_schema_loads_and_names_existing_columns(small):
    out, _ = small
    schema = load_schema(out / "schema.toml")
    assert list(schema.segments) == ["long", "short"]
    long_s, short_s = schema.segments["long"], schema.segments["short"]
    assert (long_s.word_rule, long_s.day_start_hour, long_s.position_unit) == ("daily", 4, "day")
    assert long_s.max_words == short_s.max_words == 128
    assert (short_s.word_rule, short_s.gap_minutes, short_s.position_unit) == ("session", 30.0, "hour")
    assert schema.window_seconds(long_s) == (_ms(START) // 1000, _ms(END) // 1000)
    assert schema.window_seconds(short_s) == (_ms(SHORT_START) // 1000, _ms(END) // 1000)
    assert schema.data.timezone == "Asia/Tokyo"
    assert [a.name for a in long_s.attributes] == ["action", "channel", "expense", "shop", "genre", "hour"]
    assert [a.name for a in short_s.attributes] == ["action", "shop", "genre", "device"]
    for seg in (long_s, short_s):
        files = sorted(Path(schema.base_dir).glob(seg.path))
        assert len(files) == 3
        columns = set(pq.read_schema(files[0]).names)
        assert {seg.time_column, seg.user_column or schema.data.user_column} <= columns
        for a in seg.attributes:
            assert a.column.startswith("@") or a.column in columns, (seg.name, a.column)
    expense = long_s.attributes[2]
    assert expense.column == "price" and expense.buckets
    users = pq.read_schema(schema.resolve(schema.data.users))
    assert [u.name for u in schema.user_attributes] == ["gender", "age", "region"]
    assert all(u.column in users.names for u in schema.user_attributes)
    assert schema.user_attributes[1].buckets == [18.0, 25.0, 35.0, 45.0, 55.0, 65.0]


# -- labels ------------------------------------------------------------------------------------
def test_label_files(small):
    out, s = small
    ids = _read(out / "users.parquet")["user_id"].to_numpy()
    target = _read(out / "labels/targeting.parquet")
    assert target.schema == pa.schema([("user_id", pa.int64()), ("label", pa.int8())])
    y = target["label"].to_numpy()
    assert set(np.unique(y)) == {0, 1}
    assert (y == 0).sum() == 3 * (y == 1).sum()  # responders, and three non-responders each
    assert len(np.unique(target["user_id"].to_numpy())) == len(y) and np.isin(target["user_id"], ids).all()

    parent = _read(out / "labels/is_parent.parquet")
    assert parent.schema == pa.schema([("user_id", pa.int64()), ("label", pa.int8())])
    assert 0.3 * len(ids) < parent.num_rows < 0.7 * len(ids)  # a known subset
    assert 0.15 < parent["label"].to_numpy().mean() < 0.6
    assert "is_parent" not in _read(out / "users.parquet").column_names

    nxt = _read(out / "labels/next_genre.parquet")
    assert nxt.schema == pa.schema([("user_id", pa.int64()), ("label", pa.list_(pa.string()))])
    lists = nxt["label"].to_pylist()
    assert all(len(v) == len(set(v)) >= 1 for v in lists)  # distinct genres; no-purchase users absent
    assert 0.3 * len(ids) < nxt.num_rows < len(ids)
    vocab = set(pc.unique(_read(out / "long")["genre"]).to_pylist()) | set(
        pc.unique(_read(out / "short")["genre"]).to_pylist())
    seen = [g for v in lists for g in v]
    assert np.mean([g in vocab for g in seen]) > 0.95
    assert s["counts"]["next_genre_users"] == nxt.num_rows


# -- planted signal ----------------------------------------------------------------------------
def _genre_counts(out: Path, users: np.ndarray, seg: str, action: str | None = None) -> np.ndarray:
    """[n_users, N_GENRES] event counts per genre (users in the order of ``users``)."""
    t = _read(out / seg)
    if action is not None:
        t = t.filter(pc.equal(t["action"], action))
    genre = pc.cast(pc.utf8_slice_codeunits(t["genre"], 1), pa.int64()).to_numpy()
    row = _rows(users, t["user_id"].to_numpy())
    return np.bincount(row * N_GENRES + genre, minlength=len(users) * N_GENRES).reshape(len(users), N_GENRES)


def _rows(users: np.ndarray, ids: np.ndarray) -> np.ndarray:
    order = np.argsort(users)
    return order[np.searchsorted(users[order], ids)]


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    rank = np.argsort(np.argsort(score)) + 1.0
    pos = y == 1
    return float((rank[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def _out_of_fold_scores(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """A class-conditional (naive-Bayes log-ratio) score over genre counts, each user scored by
    a model fitted on the other folds: every labelled user is a held-out user once."""
    fold = np.random.default_rng(seed).integers(0, folds, size=len(y))
    score = np.zeros(len(y))
    for f in range(folds):
        train, test = fold != f, fold == f
        pos, neg = x[train & (y == 1)].sum(0) + 1.0, x[train & (y == 0)].sum(0) + 1.0
        log_ratio = np.log(pos / pos.sum()) - np.log(neg / neg.sum())
        score[test] = (x[test] @ log_ratio) / np.maximum(x[test].sum(1), 1)
    return score


def _label_features(out: Path, label_file: str) -> tuple[np.ndarray, np.ndarray]:
    users = _read(out / "users.parquet")["user_id"].to_numpy()
    counts = _genre_counts(out, users, "long", "purchase") + _genre_counts(out, users, "short")
    lab = _read(out / "labels" / label_file)
    return counts[_rows(users, lab["user_id"].to_numpy())], lab["label"].to_numpy()


def test_is_parent_is_predictable_from_genre_counts(signal):
    out, _ = signal
    x, y = _label_features(out, "is_parent.parquet")
    auc = _auc(_out_of_fold_scores(x, y), y)
    print(f"is_parent out-of-fold AUC from genre counts: {auc:.3f} ({len(y)} users)")
    assert auc > 0.65
    # Shuffled labels carry no signal: the score is not an artefact of the method.
    y_perm = np.random.default_rng(1).permutation(y)
    assert abs(_auc(_out_of_fold_scores(x, y_perm), y_perm) - 0.5) < 0.04


def test_targeting_is_predictable_from_genre_counts(signal):
    out, _ = signal
    x, y = _label_features(out, "targeting.parquet")
    auc = _auc(_out_of_fold_scores(x, y), y)
    print(f"targeting out-of-fold AUC from genre counts: {auc:.3f} ({len(y)} users)")
    assert auc > 0.62


def test_next_genre_rewards_reading_the_history(signal):
    """Ranking genres by the user's own history (smoothed with popularity) beats popularity."""
    out, _ = signal
    users = _read(out / "users.parquet")["user_id"].to_numpy()
    bought = _genre_counts(out, users, "long", "purchase")
    viewed = _genre_counts(out, users, "short")
    lab = _read(out / "labels/next_genre.parquet")
    rows = _rows(users, lab["user_id"].to_numpy())
    truth = [{int(g[1:]) for g in v} for v in lab["label"].to_pylist()]
    pop = bought.sum(0) / bought.sum()

    def hit_rate(top10: np.ndarray) -> float:
        return float(np.mean([len(t & set(r)) > 0 for t, r in zip(truth, top10.tolist())]))

    hit_pop = hit_rate(np.tile(np.argsort(-pop)[:10], (len(rows), 1)))
    own = bought[rows] + 0.3 * viewed[rows] + 0.5 * pop
    hit_own = hit_rate(np.argsort(-own, axis=1)[:, :10])
    print(f"next_genre hit@10: own history {hit_own:.3f}, popularity {hit_pop:.3f} ({len(rows)} users)")
    assert hit_own > hit_pop + 0.15
    # The recent browsing (short-term segment) carries signal of its own.
    hit_recent = hit_rate(np.argsort(-(viewed[rows] + 0.5 * pop), axis=1)[:, :10])
    assert hit_recent > hit_pop + 0.05
