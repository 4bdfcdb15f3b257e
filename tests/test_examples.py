"""The real-data recipes: Complete Journey (its CC0 sample ships in examples/) and the MovieLens-100K
adapter (on a hand-written fixture in the ml-100k format; MovieLens itself may not be redistributed)."""

import datetime as dt
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.downstream.tasks import load_task
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.parent.name + "_convert", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_complete_journey_conversion_windows_labels_and_schema(tmp_path):
    cj = _module(EXAMPLES / "completejourney" / "convert.py")
    assert (EXAMPLES / "completejourney" / "data" / "SOURCE.md").read_text().count("CC0") >= 1
    counts = cj.convert(tmp_path / "cj", max_households=150)
    out = tmp_path / "cj"
    long = pq.read_table(out / "long")
    cut = dt.datetime(2017, 11, 1)
    assert long.num_rows == counts["events_before_cut"] > 0
    assert max(long.column("ts").to_pylist()) < cut  # nothing after the cut reaches the model
    assert set(long.column_names) == {"user_id", "ts", "shop", "genre", "department", "brand", "price"}
    users = pq.read_table(out / "users.parquet")
    assert "kids_count" not in users.column_names and "household_comp" not in users.column_names
    tokenize(load_schema(out / "schema.toml"), out / "tok", progress=False)
    data = open_tokenized(out / "tok")
    assert data.num_users == counts["households_with_history"] <= 150
    manifest = data.manifest
    assert manifest["segments"]["long"]["attributes"] == ["shop", "genre", "department", "brand", "price", "hour"]
    assert manifest["user_attributes"]["names"] == ["age", "income", "home_ownership", "marital_status"]
    kids = load_task(out / "labels" / "has_kids.parquet", data, "binary", strict_users=True)
    assert len(kids) == counts["has_kids_users"] and kids.y.sum() == counts["has_kids_positive"]
    camp = load_task(out / "labels" / "campaign_response.parquet", data, "binary", strict_users=True)
    assert 0 < camp.y.sum() < len(camp)
    nxt = load_task(out / "labels" / "next_category.parquet", data, "next", "long.genre", strict_users=True)
    assert 0 < len(nxt) <= counts["next_users"]
    # the next-category labels are exactly the categories bought after the cut
    raw = cj._read_csv(cj.DATA / "transactions_sample.csv.gz")
    products = cj._read_csv(cj.DATA / "products_in_sample.csv.gz")
    cat = dict(zip(products.column("product_id").to_pylist(), products.column("product_category").to_pylist()))
    uid = pq.read_table(out / "labels" / "next_category.parquet").to_pylist()[0]
    expected = {cat.get(p) for h, p, t in zip(raw.column("household_id").to_pylist(),
                                              raw.column("product_id").to_pylist(),
                                              raw.column("transaction_timestamp").to_pylist())
                if h == uid["user_id"] and t >= cut} - {None}
    assert set(uid["label"]) == expected


# -- MovieLens-100K, a hand-written fixture in its format --------------------------------------------------
def _t(s: str) -> int:
    return int(dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC).timestamp())


GENRE_FLAGS = {  # movie -> genres (the ml-100k genre order: unknown, Action, Adventure, ..., Western)
    1: ["Animation", "Children's", "Comedy"], 2: ["Action", "Adventure", "Thriller"], 3: ["Thriller"],
    4: ["Action", "Comedy", "Drama"], 5: ["Crime", "Drama", "Thriller"], 6: ["Drama"],
}
U_ITEM_DATES = {1: "01-Jan-1995", 2: "01-Jan-1995", 3: "01-Jan-1995", 4: "01-Jan-1995", 5: "01-Jan-1995",
                6: ""}
U_USER = """1|24|M|technician|85711
2|53|F|other|94043
3|23|M|writer|32067
4|24|M|technician|43537
5|33|F|other|15213
"""
RATINGS = [  # user, item, rating, time
    (1, 1, 5, "1997-10-01T10:00:00"), (1, 2, 3, "1997-10-01T10:05:00"), (1, 3, 4, "1997-10-03T20:00:00"),
    (1, 6, 2, "1998-03-05T09:00:00"), (1, 5, 4, "1998-03-06T09:00:00"),
    (2, 4, 4, "1997-11-11T02:00:00"), (2, 4, 5, "1997-11-11T05:00:00"), (2, 6, 3, "1998-03-02T12:00:00"),
    (3, 2, 1, "1997-12-24T23:00:00"),
    (4, 1, 4, "1998-01-15T08:00:00"), (4, 3, 5, "1998-01-15T08:30:00"), (4, 5, 2, "1998-02-20T18:00:00"),
    (5, 6, 5, "1998-03-10T10:00:00"),  # only after the cut: not a user of the input
]


def _write_ml100k(d: Path) -> None:
    from_genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                   "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                   "War", "Western"]
    d.mkdir()
    (d / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{_t(t)}\n" for u, m, r, t in RATINGS))
    lines = []
    for m, genres in GENRE_FLAGS.items():
        flags = "|".join("1" if g in genres else "0" for g in from_genres)
        lines.append(f"{m}|Movie {m} (1995)|{U_ITEM_DATES[m]}||http://us.imdb.com/M/title-exact?{m}|{flags}\n")
    (d / "u.item").write_text("".join(lines), encoding="latin-1")
    (d / "u.user").write_text(U_USER)


def test_movielens_adapter_on_a_hand_written_fixture(tmp_path):
    ml = _module(EXAMPLES / "movielens" / "convert.py")
    _write_ml100k(tmp_path / "ml-100k")
    counts = ml.convert(tmp_path / "ml-100k", tmp_path / "out", cut="1998-03-01")
    assert counts["ratings_before_cut"] == 9 and counts["ratings_after_cut"] == 4
    assert counts["users_with_history"] == 4 and counts["next_genre_users"] == 2
    out = tmp_path / "out"
    ratings = pq.read_table(out / "ratings").to_pylist()
    by = {(r["user_id"], r["item"]): r for r in ratings}
    assert by[(1, 1)]["genre"] == "Animation" and by[(1, 2)]["genre"] == "Action"  # the first listed genre
    assert by[(1, 1)]["decade"] == "1990s" and by[(1, 3)]["rating"] == 4 and by[(4, 5)]["rating"] == 2
    nxt = {r["user_id"]: sorted(r["label"]) for r in pq.read_table(out / "labels" / "next_genre.parquet").to_pylist()}
    assert nxt == {1: ["Crime", "Drama"], 2: ["Drama"]}  # user 5 has no history, so no label row
    gender = {r["user_id"]: r["label"] for r in pq.read_table(out / "labels" / "gender.parquet").to_pylist()}
    assert gender == {1: 0, 2: 1, 3: 0, 4: 0}
    assert "gender" not in pq.read_table(out / "users.parquet").column_names  # a label is never an input
    tokenize(load_schema(out / "schema.toml"), out / "tok", progress=False)
    data = open_tokenized(out / "tok")
    seg = data.segment("ratings")
    words = np.diff(seg.user_word_offsets)
    rows = {u: i for i, u in enumerate(data.user_ids.to_pylist())}
    # daily words from 04:00: user 2's 02:00 and 05:00 ratings fall on two days; user 1 has two days
    assert words[rows[2]] == 2 and words[rows[1]] == 2 and words[rows[4]] == 2
    td = load_task(out / "labels" / "occupation.parquet", data, "multiclass", strict_users=True)
    assert td.classes == ["other", "technician", "writer"]
    td = load_task(out / "labels" / "next_genre.parquet", data, "next", "ratings.genre")
    assert len(td) >= 1  # genres never seen before the cut cannot be ranked and are dropped
    assert json.loads((out / "CONVERT.json").read_text())["cut"] == "1998-03-01"


def _write_recbole(d: Path) -> None:
    """The same fixture in RecBole's atomic layout (ml-100k.inter/.item/.user, as in its wheel)."""
    d.mkdir(parents=True)
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{m}\t{r}\t{_t(t)}\n" for u, m, r, t in RATINGS))
    years = {m: (d_[-4:] if d_ else "unkonwn") for m, d_ in U_ITEM_DATES.items()}  # RecBole's spelling
    (d / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                    + "".join(f"{m}\tMovie {m}\t{years[m]}\t{' '.join(g)}\n"
                                              for m, g in GENRE_FLAGS.items()))
    (d / "ml-100k.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                    + U_USER.replace("|", "\t"))


def test_movielens_recbole_layout_equals_grouplens(tmp_path):
    """RecBole's atomic files (a directory, or the files inside a wheel) give exactly the tables and
    labels that GroupLens' files give."""
    import zipfile

    ml = _module(EXAMPLES / "movielens" / "convert.py")
    _write_ml100k(tmp_path / "ml-100k")
    _write_recbole(tmp_path / "recbole" / "ml-100k")
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in (tmp_path / "recbole" / "ml-100k").iterdir():
            z.write(f, f"recbole/dataset_example/ml-100k/{f.name}")
    outs = {}
    for name, src in (("grouplens", tmp_path / "ml-100k"), ("recbole", tmp_path / "recbole" / "ml-100k"),
                      ("wheel", wheel)):
        counts = ml.convert(src, tmp_path / name, cut="1998-03-01")
        assert counts["layout"] == ("grouplens" if name == "grouplens" else "recbole")
        outs[name] = {p.relative_to(tmp_path / name).as_posix(): pq.read_table(p).to_pylist()
                      for p in sorted((tmp_path / name).rglob("*.parquet")) if "_source" not in p.parts}
    assert outs["recbole"] == outs["grouplens"] and outs["wheel"] == outs["grouplens"]
    assert set(outs["grouplens"]) >= {"labels/gender.parquet", "labels/occupation.parquet",
                                      "labels/next_genre.parquet", "labels/next_movie.parquet"}
    nxt = {r["user_id"]: sorted(r["label"]) for r in outs["grouplens"]["labels/next_movie.parquet"]}
    assert nxt == {1: [5, 6], 2: [6]}
    # A wrong header names the file and what was expected.
    (tmp_path / "recbole" / "ml-100k" / "ml-100k.user").write_text("id\tage\n1\t20\n")
    with pytest.raises(ml.MovieLensFormatError, match=r"ml-100k.user:1: expected the header"):
        ml.convert(tmp_path / "recbole" / "ml-100k", tmp_path / "bad")


def test_movielens_adapter_names_the_bad_line(tmp_path):
    ml = _module(EXAMPLES / "movielens" / "convert.py")
    _write_ml100k(tmp_path / "ml-100k")
    with open(tmp_path / "ml-100k" / "u.data", "a") as f:
        f.write("7\t1\tfive\t880000000\n")
    with pytest.raises(ml.MovieLensFormatError, match=r"u.data:14: expected integers"):
        ml.convert(tmp_path / "ml-100k", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="u.data"):
        ml.convert(tmp_path / "nothing", tmp_path / "out2")


def test_experiment_recipe_end_to_end_on_tiny_synthetic_data(tmp_path):
    """examples/experiment.py: pretrain -> cross-validated fine-tuning and baselines -> table, curves, bars;
    cached fold results are reused only under the settings that made them."""
    exp = _module(EXAMPLES / "experiment.py")
    tiny = ["model.hidden=16", "model.layers=1", "model.heads=2", "train.steps=4", "train.warmup_steps=1",
            "train.log_every=1", "finetune.epochs=2", "finetune.patience=2", "finetune.batch_size=32"]
    models = ["pretrained", "scratch", "no_discretisation", "wide_deep_mtl", "popular", "logreg"]
    args = ["--dataset", "synthetic", "--users", "240", "--folds", "2", "--tasks", "is_parent", "--models",
            ",".join(models), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert exp.main([*args, "--set", *tiny]) == 0
    md = (tmp_path / "out" / "synthetic.md").read_text()
    for model in models:
        assert re.search(rf"\| {model} \| (\*\*)?[01]\.\d{{4}} \[[01]\.\d{{4}}, [01]\.\d{{4}}\]", md), model
    assert "pretrained - scratch" in md and "Validation auc at the chosen epoch" in md
    assert "pretrained - no_discretisation" in md and "pretrained - wide_deep_mtl" in md
    # the ablation's cost beside its metric: one word per action means more words per user
    daily = re.search(r"\| daily/session \(the paper\) \| ([\d.]+) \| ([\d.]+) \|", md)
    action = re.search(r"\| one per action \| ([\d.]+) \| ([\d.]+) \|", md)
    assert daily and action and float(action.group(1)) > float(daily.group(1))
    assert float(action.group(1)) == pytest.approx(float(action.group(2)), rel=0.02)  # a word is an action
    doc = json.loads((tmp_path / "out" / "synthetic.json").read_text())
    report = doc["tasks"]["is_parent"]["report"]
    iv = report["metrics"]["pretrained"]["auc"]
    assert iv["low"] <= iv["value"] <= iv["high"] and report["metrics"]["popular"]["auc"]["value"] == 0.5
    assert [len(v) for v in doc["tasks"]["is_parent"]["fold_metrics"].values()] == [2] * len(models)
    for png in ("synthetic_is_parent.png", "synthetic_bars.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000
    with pytest.raises(SystemExit, match="other settings"):
        exp.main([*args, "--set", *tiny, "finetune.lr=0.5"])
    # the results page: the paper's table shape from the JSON, written between its markers
    page_mod = _module(EXAMPLES / "results_page.py")
    page = tmp_path / "out" / "README.md"
    page.write_text("# Results\n\nhand-written text stays\n")
    page_mod.write_page(tmp_path / "out", ["synthetic"])
    page_mod.write_page(tmp_path / "out", ["synthetic"])  # a second run replaces the block, it does not add one
    text = page.read_text()
    assert text.count(page_mod.START) == 1 and "hand-written text stays" in text
    main_table = text[text.index("| model |"):].split("\n\n")[0].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table[2:]}
    assert {"UserBERT (ours: pretrained, fine-tuned)", "without discretisation (one word per action)",
            "Wide&Deep + MTL", "logistic regression on counts"} <= set(rows)
    auc = {m: report["metrics"][m]["auc"]["value"] for m in models}
    best = max(auc.values())
    assert sum(line.count(f"**{best:.3f} [") for line in rows.values()) >= 1  # the column's best is bold
    assert "| pretraining helps (ours > without pretraining) |" in text and "one per action" in text


def test_user_folds_give_every_user_one_role_per_fold_shared_by_all_tasks():
    exp = _module(EXAMPLES / "experiment.py")
    folds = exp.user_folds(1000, 5, 0, 0.1)
    test = np.stack([r == exp.TEST for r in folds])
    assert (test.sum(0) == 1).all()  # every user is tested exactly once
    assert all(abs(int((r == exp.VAL).sum()) - 100) <= 1 for r in folds)  # 10% of all users validate
    assert all(((r == exp.VAL) & (r == exp.TEST)).sum() == 0 for r in folds)
    assert np.array_equal(exp.user_folds(1000, 5, 0, 0.1)[2], folds[2])  # reproducible
    # two tasks over different labelled users: a user's role is the same in both
    a, b = np.arange(0, 1000, 2), np.arange(0, 1000, 3)
    sa, sb = exp.task_split(a, folds[1]), exp.task_split(b, folds[1])
    common = np.intersect1d(a, b)
    role = lambda rows, sp: {int(rows[i]): k for k, part in enumerate((sp.train, sp.val, sp.test)) for i in part}
    ra, rb = role(a, sa), role(b, sb)
    assert all(ra[u] == rb[u] for u in common)


def test_experiment_prepares_movielens_tasks_from_the_recbole_layout(tmp_path):
    """--dataset movielens: the four tasks of the results page, each with its ranked attribute; next_movie
    never ranks a movie the user has rated."""
    exp = _module(EXAMPLES / "experiment.py")
    _write_recbole(tmp_path / "rb")
    with pytest.raises(SystemExit, match="needs --source"):
        exp.prepare("movielens", tmp_path / "w0", 0, None)
    tok, tasks = exp.prepare("movielens", tmp_path / "w", 0, tmp_path / "rb")
    by = {t.name: t for t in tasks}
    assert sorted(by) == ["gender", "next_genre", "next_movie", "occupation"]
    assert (by["next_movie"].next_attribute, by["next_movie"].exclude_seen) == ("ratings.item", True)
    assert by["next_genre"].next_attribute == "ratings.genre" and not by["next_genre"].exclude_seen
    data = open_tokenized(tok)
    cfg = exp.load_config(exp.CONFIGS / "movielens.toml")
    # (the fixture's later movies were never rated before the cut, so next_movie has no rankable label here;
    # tests/test_downstream_finetune.py checks exclude_seen on a next task)
    genre = exp.load_spec(exp.TaskSpec("g", by["next_genre"].labels, "next", "", "ratings.genre", True), data, cfg)
    seg = data.segment("ratings")
    k = seg.attributes.index("genre")
    for i, r in enumerate(genre.rows):
        own = np.unique(seg.attr_ids[seg.user_action_offsets[r]:seg.user_action_offsets[r + 1], k])
        assert genre.seen_ids[genre.seen_offsets[i]:genre.seen_offsets[i + 1]].tolist() == own.tolist()
    assert exp.load_spec(by["occupation"], data, cfg).task == "multiclass"
    action = exp.tokenize_words(tmp_path / "w" / "raw", tmp_path / "w", "action")
    seg = open_tokenized(action).segment("ratings")
    assert (np.diff(seg.word_offsets()) == 1).all()  # no discretisation: every word is one action


def test_search_chooses_each_folds_variant_on_validation_only():
    """The nested choice: per fold, the best validation metric wins, and only that fold's test rows are taken."""
    search = _module(EXAMPLES / "search.py")
    fold_of = np.array([0, 0, 1, 1, 1])
    hist = lambda *vals: [{"val.auc": v} for v in vals]
    runs = {"reference": {"fold_of": fold_of, "oof": {"m": np.full((5, 1), 1.0)},
                          "histories": {"m": [hist(0.6, 0.7), hist(0.9)]}},
            "other": {"fold_of": fold_of, "oof": {"m": np.full((5, 1), 2.0)},
                      "histories": {"m": [hist(0.8), hist(0.5, 0.9)]}}}  # fold 1: a tie goes to the reference
    oof, chosen = search.nested_choice(runs, "m", "auc", 2)
    assert chosen == ["other", "reference"] and oof[:, 0].tolist() == [2, 2, 1, 1, 1]
    assert not search.applies(search.VARIANTS["wide"], "next") and search.applies(search.VARIANTS["wide"], "binary")


def test_search_end_to_end_on_tiny_synthetic_data(tmp_path):
    search = _module(EXAMPLES / "search.py")
    tiny = ["model.hidden=16", "model.layers=1", "model.heads=2", "train.steps=4", "train.warmup_steps=1",
            "train.log_every=1", "finetune.epochs=2", "finetune.patience=2", "finetune.batch_size=32"]
    assert search.main(["--dataset", "synthetic", "--users", "200", "--folds", "2", "--tasks", "is_parent",
                        "--variants", "reference,cls,bag", "--out", str(tmp_path / "out"), "--work",
                        str(tmp_path / "work"), "--set", *tiny]) == 0
    doc = json.loads((tmp_path / "out" / "search_synthetic.json").read_text())
    t = doc["tasks"]["is_parent"]
    assert set(t["validation"]) == {"reference", "cls", "bag"} and len(t["chosen"]) == 2
    assert set(t["chosen"]) <= {"reference", "cls", "bag"}
    assert "scratch" not in t["validation"]["bag"]  # a pretraining-only switch shares the reference's scratch run
    assert {"tuned", "scratch_tuned", "reference", "logreg"} <= set(t["report"]["metrics"])
    assert "tuned - scratch_tuned" in t["report"]["differences"]
    assert (tmp_path / "work" / "search" / "pretrain_bag" / "model").is_dir()
    assert not (tmp_path / "work" / "search" / "pretrain_cls").exists()  # a fine-tuning switch reuses pretraining


def test_probe_benchmark_end_to_end_on_tiny_synthetic_data(tmp_path):
    """examples/probe.py: snapshots (0 = untrained), a user fraction, probes of embeddings and counts, the page."""
    probe = _module(EXAMPLES / "probe.py")
    tiny = ["model.hidden=16", "model.layers=1", "model.heads=2", "train.warmup_steps=1", "train.log_every=1",
            "train.batch_size=16"]
    assert probe.main(["--dataset", "synthetic", "--users", "200", "--folds", "2", "--tasks", "is_parent",
                       "--variants", "paper", "--steps", "0,2,4", "--fractions", "0.5", "--out", str(tmp_path / "out"),
                       "--work", str(tmp_path / "work"), "--set", *tiny]) == 0
    doc = json.loads((tmp_path / "out" / "probe_synthetic.json").read_text())
    t = doc["tasks"]["is_parent"]
    assert set(t["report"]["metrics"]) == {"counts", "embedding (paper)", "counts+embedding (paper)"}
    assert set(t["curve"]) == {"paper|0|1", "paper|2|1", "paper|4|1", "paper|4|0.5"}
    assert all(0.0 <= v <= 1.0 for v in t["curve"].values())
    assert "embedding (paper) - counts" in t["report"]["differences"]
    assert (tmp_path / "out" / "probe_synthetic.png").stat().st_size > 5000
    assert (tmp_path / "work" / "probe" / "pretrain_paper" / "model_step2").is_dir()
