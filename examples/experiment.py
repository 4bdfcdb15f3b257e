"""The results recipe: pretrain -> fine-tune (pretrained and scratch) -> the paper's baselines -> tables.

    python examples/experiment.py --dataset completejourney --out docs/results
    python examples/experiment.py --dataset movielens --source /tmp/recbole/recbole-1.2.1-py3-none-any.whl
    python examples/experiment.py --dataset synthetic --out docs/results

Per dataset: prepare the data (Complete Journey: examples/completejourney/convert.py; MovieLens-100K:
examples/movielens/convert.py on ``--source``, GroupLens' or RecBole's files; synthetic:
`userbert-engine synth` with the demo's settings), tokenize, pretrain once with
examples/configs/<dataset>.toml, then run K-fold cross-validation **by user**: every user of the data
is given one fold, the same for every task and model; fold f is the test set once, and of the other
users ``finetune.val_fraction`` (of all users) pick every choice (epoch, L2, weights) and the rest train.
Every model and baseline gets one out-of-fold prediction per labelled user, so the bootstrap intervals are
over all labelled users rather than one 20% test split, and the paired differences (pretrained - scratch,
...) use the same resamples.  The multi-task baselines train on all tasks at once, so a user's labels of
every task are in the same role (train, validation or test) in a fold.

Models:

- ``pretrained`` (ours: the pretrained encoder, fine-tuned end to end per task), ``scratch`` (the same
  architecture and recipe without pretraining: the paper's "without pretraining"), ``frozen`` (the
  pretrained encoder frozen, a linear head: what pretraining alone put into the representation);
- ``no_discretisation`` (the paper's "without discretisation": every action its own word,
  ``word_rule = "action"`` on every segment, tokenized and pretrained again with the same model and budget,
  then fine-tuned like ``pretrained``);
- the paper's multi-task baselines (engine/downstream/mtl_baselines.py), trained on the downstream tasks
  only, jointly: ``wide_deep_mtl``, ``lstm_mtl``, ``transformer_mtl`` (the UserBERT encoder from scratch);
- ``popular`` (popular-unseen on tasks that exclude seen items), ``history`` (next-item only) and ``logreg``.

Writes ``<out>/<dataset>.md`` (tables), ``<out>/<dataset>.json`` (all numbers, per-fold values,
settings) and ``<out>/<dataset>_<task>.png`` (test metric per fine-tuning epoch, mean over folds,
with the baselines as dashed lines).  Intermediate results are cached under ``--work``, so an
interrupted run resumes where it stopped.  examples/results_page.py joins the datasets into one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from engine.config import RunConfig, VocabSpec, load_config  # noqa: E402
from engine.downstream.evaluate import baseline_outputs, evaluate_outputs  # noqa: E402
from engine.downstream.finetune import build_encoder, finetune, predict  # noqa: E402
from engine.downstream.tasks import (  # noqa: E402
    PRIMARY_METRIC,
    Split,
    load_task,  # noqa: E402
    split_indices,
)

log = logging.getLogger("userbert")
CONFIGS = Path(__file__).resolve().parent / "configs"


FINETUNED = ("pretrained", "scratch", "frozen", "no_discretisation")
MTL_ARCHS = {"wide_deep_mtl": "wide_deep", "lstm_mtl": "lstm", "transformer_mtl": "transformer"}
BASELINE_NAMES = ("popular", "history", "logreg")
ALL_MODELS = (*FINETUNED, *MTL_ARCHS, *BASELINE_NAMES)
DATASETS = ("completejourney", "movielens", "synthetic")


@dataclass
class TaskSpec:
    name: str
    labels: Path
    task: str
    what: str
    next_attribute: str | None = None  # next: the ranked attribute (default: the config's finetune.next_attribute)
    exclude_seen: bool = False  # next: never rank an item the user already has (a movie is rated once)


def prepare(dataset: str, work: Path, users: int, source: Path | None = None) -> tuple[Path, list[TaskSpec]]:
    """Raw data -> tokenized directory; the tasks and their label tables."""
    raw = work / "raw"
    if dataset == "movielens":
        if not (raw / "schema.toml").exists():
            if source is None:
                raise SystemExit("--dataset movielens needs --source: GroupLens' ml-100k directory or zip, or the "
                                 "RecBole wheel (pip download recbole==1.2.1 --no-deps); see examples/movielens")
            sys.path.insert(0, str(ROOT / "examples" / "movielens"))
            from convert import convert

            convert(source, raw)
        lab = raw / "labels"
        tasks = [TaskSpec("gender", lab / "gender.parquet", "binary", "female (the user table's gender)"),
                 TaskSpec("occupation", lab / "occupation.parquet", "multiclass",
                          "the user table's occupation (21 classes)"),
                 TaskSpec("next_genre", lab / "next_genre.parquet", "next",
                          "genres rated after 1998-03-01, the end of the pretraining window", "ratings.genre"),
                 TaskSpec("next_movie", lab / "next_movie.parquet", "next",
                          "movies rated after the window, ranked among the movies the user has not rated",
                          "ratings.item", exclude_seen=True)]
    elif dataset == "completejourney":
        if not (raw / "schema.toml").exists():
            sys.path.insert(0, str(ROOT / "examples" / "completejourney"))
            from convert import convert

            convert(raw)
        tasks = [TaskSpec("next_category", raw / "labels" / "next_category.parquet", "next",
                          "product categories bought in the 2 months after the pretraining window"),
                 TaskSpec("has_kids", raw / "labels" / "has_kids.parquet", "binary",
                          "kids_count > 0 (households with demographics)"),
                 TaskSpec("campaign_response", raw / "labels" / "campaign_response.parquet", "binary",
                          "redeemed a coupon of a campaign starting after the window (its recipients)")]
    elif dataset == "synthetic":
        if not (raw / "schema.toml").exists():
            from tokenizer.synthetic import generate

            cfg = load_config(CONFIGS / "synthetic.toml")
            generate(raw, users, seed=cfg.demo.seed, n_genres=cfg.demo.genres, n_shops=cfg.demo.shops,
                     progress=False)
        tasks = [TaskSpec("next_genre", raw / "labels" / "next_genre.parquet", "next",
                          "genres bought in the 14 days after the window"),
                 TaskSpec("is_parent", raw / "labels" / "is_parent.parquet", "binary", "planted attribute"),
                 TaskSpec("targeting", raw / "labels" / "targeting.parquet", "binary", "planted campaign response")]
    else:
        raise SystemExit(f"unknown dataset {dataset!r}")
    return tokenize_words(raw, work, None), tasks


def tokenize_words(raw: Path, work: Path, word_rule: str | None) -> Path:
    """Tokenize the prepared data with its schema, or (``word_rule = "action"``: the no-discretisation
    ablation) with every segment's word rule replaced; returns the tokenized directory."""
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema

    tok = work / ("tok" if word_rule is None else f"tok_{word_rule}")
    if not (tok / "manifest.json").exists():
        schema = load_schema(raw / "schema.toml")
        for seg in schema.segments.values():
            if word_rule is not None:
                seg.word_rule = word_rule
        tokenize(schema, tok, progress=False)
    return tok


# Roles of a user in one fold.
TRAIN, VAL, TEST = 0, 1, 2


def user_folds(n_users: int, folds: int, seed: int, val_fraction: float) -> list[np.ndarray]:
    """int8 [n_users] per fold: each dataset row's role (TRAIN, VAL, TEST).  Fold f's test users are part
    f of one permutation of all users; ``val_fraction`` of all users, from the others, are its validation
    users.  One assignment for every task and model, so a user is never trained on in one task while
    tested in another."""
    perm = np.random.default_rng([seed, 4242]).permutation(n_users)
    parts = np.array_split(perm, folds)
    out = []
    for f in range(folds):
        roles = np.full(n_users, TRAIN, np.int8)
        roles[parts[f]] = TEST
        rest = np.flatnonzero(roles != TEST)
        inner = split_indices(len(rest), min(val_fraction * n_users / max(len(rest), 1), 0.5), seed + f)
        roles[rest[inner.val]] = VAL
        out.append(roles)
    return out


def task_split(rows: np.ndarray, roles: np.ndarray) -> Split:
    """The fold's Split of one task whose labelled users are dataset ``rows``: positions by role."""
    r = roles[rows]
    return Split(np.flatnonzero(r == TRAIN), np.flatnonzero(r == VAL), np.flatnonzero(r == TEST))


@dataclass
class Context:
    """What every task's runs share: the config, the folds, and per word rule its data and pretrained model."""

    cfg: RunConfig
    folds: list[np.ndarray]
    seed: int
    work: Path
    k: int
    data: dict[str, object]  # "paper" | "action" -> TokenizedData
    pretrained: dict[str, Path]  # "paper" | "action" -> exported model dir


def load_spec(spec: TaskSpec, data, cfg: RunConfig):
    return load_task(spec.labels, data, spec.task, spec.next_attribute or cfg.finetune.next_attribute,
                     exclude_seen=spec.exclude_seen)


def run_mtl(name: str, specs: list[TaskSpec], ctx: Context) -> dict[str, dict]:
    """One multi-task baseline over all tasks, per fold: {task: {"oof": outputs, "fold_metrics": [...],
    "history": [...]}} (cached per fold)."""
    from engine.downstream.metrics import task_metrics
    from engine.downstream.mtl_baselines import MTLConfig, train_mtl

    data, cfg = ctx.data["paper"], ctx.cfg
    tds = {s.name: load_spec(s, data, cfg) for s in specs}
    ft = cfg.finetune
    cache = ctx.work / "cache" / "mtl" / name
    _check_cache(cache / "settings.json", {"model": cfg.model, "finetune": ft, "folds": len(ctx.folds),
                                           "seed": ctx.seed, "k": ctx.k, "tasks": sorted(tds)})
    out = {t: {"oof": np.zeros((len(td), ctx.k if td.task == "next" else td.n_outputs),
                               np.int64 if td.task == "next" else np.float64), "fold_metrics": [], "history": []}
           for t, td in tds.items()}
    for f, roles in enumerate(ctx.folds):
        path = cache / f"fold{f}.npz"
        splits = {t: task_split(td.rows, roles) for t, td in tds.items()}
        if not path.exists():
            # The recipe of single-task fine-tuning (batch, epochs, rate, patience), on all tasks at once.
            mcfg = MTLConfig(batch_size=ft.batch_size, epochs=ft.epochs, lr=ft.lr, weight_decay=ft.weight_decay,
                             patience=ft.patience, grad_clip=ft.grad_clip, seed=ctx.seed + f)
            t0 = time.perf_counter()
            res = train_mtl(data, tds, MTL_ARCHS[name], cfg.model, np.flatnonzero(roles == TRAIN),
                            np.flatnonzero(roles == VAL), {t: td.rows[splits[t].test] for t, td in tds.items()},
                            cfg=mcfg, device=cfg.train.device, k=ctx.k,
                            predict_exclude={t: td.subset(splits[t].test).seen_csr() for t, td in tds.items()})
            log.info("%s fold %d: best epoch %d, validation score %.4f (%.0f s)", name, f, res.best_epoch,
                     res.history[res.best_epoch]["val_score"] if res.best_epoch >= 0 else float("nan"),
                     time.perf_counter() - t0)
            np.savez(path, history=json.dumps(res.history), **{f"out_{t}": o for t, o in res.outputs.items()})
        z = np.load(path, allow_pickle=False)
        for t, td in tds.items():
            o = z[f"out_{t}"]
            out[t]["oof"][splits[t].test] = o
            out[t]["fold_metrics"].append(task_metrics(td.subset(splits[t].test), o, (10,)))
            out[t]["history"].append(json.loads(str(z["history"])))
    return out


def run_task(spec: TaskSpec, ctx: Context, models: list[str], mtl: dict[str, dict[str, dict]]) -> dict:
    """Every model of ``models`` on one task: out-of-fold outputs, the report with intervals, curves."""
    from engine.data.collate import CollateConfig, Collator
    from engine.downstream.metrics import task_metrics
    from engine.model.userbert import user_attr_offsets
    from engine.train.distributed import resolve_device

    cfg = ctx.cfg
    td = load_spec(spec, ctx.data["paper"], cfg)
    # own history ranks items only, and is popular again where seen items are excluded
    models = [m for m in models if m != "history" or (td.task == "next" and not spec.exclude_seen)]
    tds = {"paper": td}
    if "no_discretisation" in models:
        tds["action"] = load_spec(spec, ctx.data["action"], cfg)
        _check_aligned(td, tds["action"], spec.name)
    cache = ctx.work / "cache" / spec.name
    _check_cache(cache / "settings.json", {"finetune": cfg.finetune, "model": cfg.model, "folds": len(ctx.folds),
                                           "seed": ctx.seed, "k": ctx.k, "labelled": len(td),
                                           "next_attribute": spec.next_attribute,
                                           "exclude_seen": spec.exclude_seen})
    width = ctx.k if td.task == "next" else td.n_outputs
    oof = {m: np.zeros((len(td), width), np.float64 if td.task != "next" else np.int64) for m in models}
    histories: dict[str, list[list[dict]]] = {m: [] for m in models if m in FINETUNED}
    fold_metrics: dict[str, list[dict]] = {m: [] for m in models}
    dev = resolve_device(cfg.train.device)
    collators = {w: Collator(d, user_attr_offsets(VocabSpec.from_manifest(d.manifest)), CollateConfig(select_prob=0.0))
                 for w, d in ctx.data.items()}
    splits = [task_split(td.rows, roles) for roles in ctx.folds]
    for f, split in enumerate(splits):
        test = td.subset(split.test)
        for m in models:
            path = cache / f"{m}_fold{f}.npz"
            if m in MTL_ARCHS:
                out, hist = mtl[m][spec.name]["oof"][split.test], []
            elif path.exists():
                z = np.load(path, allow_pickle=False)
                out = z["out"]
                hist = json.loads(str(z["history"]))
            elif m in FINETUNED:
                words = "action" if m == "no_discretisation" else "paper"
                data, tdw = ctx.data[words], tds[words]
                ft = _ft_for(cfg, m, ctx.seed + f, spec)
                init = None if m == "scratch" else ctx.pretrained[words]
                t = time.perf_counter()
                enc = build_encoder(init, cfg.model, VocabSpec.from_manifest(data.manifest), seed=ctx.seed + f)
                res = finetune(data, tdw, ft, enc, split=split, device=cfg.train.device, progress=False,
                               init_name=m, pretrained=init is not None)
                out = predict(res.model, collators[words], test.rows, 256, dev, k=ctx.k,
                              exclude=test.seen_csr())[0]
                hist = res.history
                log.info("%s %s fold %d: best epoch %d, test %s %.4f (%.0f s)", spec.name, m, f, res.best_epoch,
                         PRIMARY_METRIC[td.task], res.test.get(PRIMARY_METRIC[td.task], float("nan")),
                         time.perf_counter() - t)
                np.savez(path, out=out, history=json.dumps(hist))
            else:
                out = baseline_outputs(ctx.data["paper"], td, split, (m,), spec.next_attribute or
                                       cfg.finetune.next_attribute, k=ctx.k)[m]
                hist = []
                np.savez(path, out=out, history=json.dumps(hist))
            oof[m][split.test] = out
            if m in histories:
                histories[m].append(hist)
            fold_metrics[m].append(task_metrics(test, out, (10,)))
    fold_of = np.zeros(len(td), np.int64)
    for f, split in enumerate(splits):
        fold_of[split.test] = f
    t = time.perf_counter()
    ours = "pretrained" if "pretrained" in models else models[0]
    report = evaluate_outputs(td, oof, ks=(10, 20), n_boot=1000, seed=ctx.seed, groups=fold_of,
                              compare=[(ours, b) for b in models if b != ours])
    log.info("%s: bootstrap intervals of %d models in %.1f s", spec.name, len(models), time.perf_counter() - t)
    return {"spec": spec, "td": td, "report": report, "histories": histories, "fold_metrics": fold_metrics,
            "sizes": {"labelled": len(td), "folds": len(splits), **splits[0].sizes()}, "oof": oof, "fold_of": fold_of}


def _check_aligned(td, other, name: str) -> None:
    """The ablation's tokenization must hold the same users and label ids, so that outputs are paired."""
    same = np.array_equal(td.rows, other.rows) and (
        td.y is not None and np.array_equal(td.y, other.y)
        or td.label_ids is not None and np.array_equal(td.label_ids, other.label_ids))
    if not same:
        raise SystemExit(f"{name}: the action-word tokenization has other users or label ids than the daily one; "
                         "both must come from the same prepared data (delete the work directory's tok_action)")


def _check_cache(path: Path, settings: dict) -> None:
    """Cached fold results are only reused under the settings that made them (another --set: another --work)."""
    from common.typed_config import to_dict

    doc = json.loads(json.dumps({k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v
                                 for k, v in settings.items()}, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        for k, v in settings.items():  # an option added since (absent there) was at its default, which is the old code
            if hasattr(v, "__dataclass_fields__") and isinstance(old.get(k), dict):
                old[k] = {**json.loads(json.dumps(to_dict(type(v)()), default=str)), **old[k]}
        if old != doc:
            diff = sorted(k for k in set(old) | set(doc) if old.get(k) != doc.get(k))
            raise SystemExit(f"{path.parent}: cached fold results were made with other settings ({', '.join(diff)} "
                             "differ); pass another --work, or delete that directory to recompute")
    else:
        path.write_text(json.dumps(doc, indent=2))


def _ft_for(cfg: RunConfig, model: str, seed: int, spec: TaskSpec | None = None):
    import copy

    ft = copy.deepcopy(cfg.finetune)
    ft.seed = seed
    if spec is not None and spec.next_attribute:
        ft.next_attribute = spec.next_attribute  # the attribute this task ranks (and whose pretext head starts it)
    if model == "frozen":
        # A linear probe: only the head trains, on fixed features, so it needs a larger rate and more epochs
        # than end-to-end fine-tuning, and cannot overfit much.
        ft.freeze_encoder = True
        ft.epochs = max(ft.epochs, 20)
        ft.patience = max(ft.patience, 5)
        ft.lr = 1e-2
        ft.head_lr_mult = 1.0
    return ft


def mean_curve(histories: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over folds of ``key`` per epoch (folds that stopped early count until they stopped)."""
    n = max((len(h) for h in histories), default=0)
    xs, mu, sd = [], [], []
    for e in range(n):
        vals = [h[e][key] for h in histories if len(h) > e and key in h[e]]
        if len(vals) >= max(1, len(histories) // 2):
            xs.append(e + 1)
            mu.append(np.mean(vals))
            sd.append(np.std(vals))
    return np.array(xs), np.array(mu), np.array(sd)


def plot(result: dict, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec, report = result["spec"], result["report"]
    metric = PRIMARY_METRIC[spec.task]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (name, hists) in enumerate(result["histories"].items()):
        xs, mu, sd = mean_curve(hists, f"test.{metric}")
        if len(xs):
            ax.plot(xs, mu, marker="o", color=f"C{i}", label=f"{name} (fine-tuned)" if name != "frozen" else
                    "pretrained, frozen encoder")
            ax.fill_between(xs, mu - sd, mu + sd, color=f"C{i}", alpha=0.15)
    for j, name in enumerate(n for n in ("popular", "history", "logreg") if n in report.metrics):
        ax.axhline(report.metrics[name][metric].value, linestyle="--", color=f"C{j + 3}", label=name)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{dataset}: {spec.name} (mean ± sd over {result['sizes']['folds']} folds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def validation_scores(histories: dict[str, list[list[dict]]], metric: str) -> dict[str, float]:
    """Per fine-tuned model: the best validation ``metric`` over epochs (the chosen epoch's), mean over folds."""
    out = {}
    for name, hists in histories.items():
        best = [max(h[f"val.{metric}"] for h in hist) for hist in hists if hist and f"val.{metric}" in hist[0]]
        if best:
            out[name] = float(np.mean(best))
    return out


MODEL_ORDER = ALL_MODELS


def plot_bars(results: list[dict], dataset: str, path: Path) -> None:
    """One panel per task: the primary metric of every model with its 95% bootstrap interval as whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results):
        spec, report = r["spec"], r["report"]
        metric = PRIMARY_METRIC[spec.task]
        names = [m for m in MODEL_ORDER if m in report.metrics]
        iv = [report.metrics[m][metric] for m in names]
        vals = np.array([i.value for i in iv])
        err = np.array([[i.value - i.low for i in iv], [i.high - i.value for i in iv]])
        ax.bar(range(len(names)), vals, yerr=err, capsize=4, color=[f"C{MODEL_ORDER.index(m)}" for m in names])
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_ylabel(metric)
        if metric == "auc":
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(0.3, 1.0)
        low = ax.get_ylim()[0]
        for x, v in enumerate(vals):
            ax.text(x, (low + v) / 2, f"{v:.3f}", ha="center", va="center", fontsize=7, color="white", rotation=90)
        ax.set_title(f"{spec.name} ({r['sizes']['labelled']} users)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{dataset}: out-of-fold test metric, 95% bootstrap intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: list[dict], dataset: str, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"## {dataset}", "", meta["description"], "",
             f"Pretraining: {meta['pretrain_steps']} steps of {meta['batch_size']} users, "
             f"{meta['pretrain_seconds']:.0f} s on {meta['machine']}; model L={meta['layers']}, H={meta['hidden']}. "
             f"Fine-tuning recipe: `{meta['finetune']}`.", ""]
    if len(meta.get("words", {})) > 1:
        # The paper's discretisation claim is also about cost: tokens per user and training speed.
        lines += ["Words (tokens) per user and pretraining cost, daily/session words against one word per action "
                  "(the `no_discretisation` row; the model keeps the last 128 words of each segment):", "",
                  "| words | words per user | actions per user | pretraining s | pretraining users/s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {'one per action' if w == 'action' else 'daily/session (the paper)'} | {v['words_per_user']} | "
                  f"{v['actions_per_user']} | {v['pretrain_seconds']} | {v['pretrain_users_per_s']} |"
                  for w, v in meta["words"].items()]
        lines.append("")
    doc: dict = {"dataset": dataset, "meta": meta, "tasks": {}}
    for r in results:
        spec, report = r["spec"], r["report"]
        metrics = {"next": ["map@10", "recall@10", "ndcg@10", "recall@20"], "binary": ["auc", "accuracy"],
                   "multiclass": ["accuracy", "macro_f1", "auc"]}[spec.task]
        title = (f"{spec.name} ({spec.task}: {spec.what}); {r['sizes']['labelled']} labelled users, "
                 f"{r['sizes']['folds']}-fold cross-validation (per fold ~{r['sizes']['train']} train / "
                 f"{r['sizes']['val']} val / {r['sizes']['test']} test)")
        lines.append(report.markdown(metrics, title=title))
        primary = PRIMARY_METRIC[spec.task]
        if spec.task == "next" and "popular" in report.metrics:
            pop = report.metrics["popular"][primary].value
            lifts = ", ".join(f"{m} {report.metrics[m][primary].value / pop:.2f}x" for m in report.metrics
                              if m != "popular")
            lines.append(f"\n{primary} relative to most-popular: {lifts}.\n")
        folds = {m: [round(x[primary], 4) for x in v] for m, v in r["fold_metrics"].items()}
        lines.append(f"\nPer-fold test {primary}: " + "; ".join(f"{m} {v}" for m, v in folds.items()) + "\n")
        val = validation_scores(r["histories"], primary)
        if val:
            # What recipe choices may look at: the validation users' metric at the chosen epoch, never test.
            lines.append(f"\nValidation {primary} at the chosen epoch (mean over folds; recipe choices are made on "
                         "these, not on the test numbers above): "
                         + "; ".join(f"{m} {v:.4f}" for m, v in val.items()) + "\n")
        png = out / f"{dataset}_{spec.name}.png"
        plot(r, dataset, png)
        lines.append(f"\n![{spec.name}]({png.name})\n")
        doc["tasks"][spec.name] = {"task": spec.task, "what": spec.what, "sizes": r["sizes"],
                                   "report": report.to_dict(), "fold_metrics": r["fold_metrics"],
                                   "validation": validation_scores(r["histories"], primary),
                                   "curves": {m: [list(map(float, c)) for c in mean_curve(h, f"test.{primary}")]
                                              for m, h in r["histories"].items()}}
    bars = out / f"{dataset}_bars.png"
    plot_bars(results, dataset, bars)
    lines.append(f"\n![bars]({bars.name})\n")
    lines.append(f"Reproduce: `{meta['command']}` ({meta['machine']}; fold results are cached under --work).\n")
    from common.atomic import atomic_write_bytes

    text, blob = "\n".join(lines) + "\n", json.dumps(doc, indent=2, default=str)
    atomic_write_bytes(out / f"{dataset}.md", text)
    atomic_write_bytes(out / f"{dataset}.json", blob)


def pretrain_once(cfg: RunConfig, tok: Path, run_dir: Path) -> dict:
    """Pretrain on ``tok`` into ``run_dir`` unless done there with the same settings; its seconds and speed."""
    from common.typed_config import to_dict

    meta_path = run_dir / "experiment_pretrain.json"
    if meta_path.exists():
        saved = json.loads((run_dir / "config.json").read_text())
        for part in ("model", "masking", "train"):
            now = getattr(cfg, part)
            # an option added since the run (absent from its config.json) was at its default: the old code's
            saved[part] = {**json.loads(json.dumps(to_dict(type(now)()), default=str)), **saved[part]}
            if saved[part] != json.loads(json.dumps(to_dict(now), default=str)):
                raise SystemExit(f"{run_dir}: pretrained with other [{part}] settings than this run's config; "
                                 "pass another --work, or delete that directory to pretrain again")
    else:
        from engine.train.pretrain import pretrain

        t = time.perf_counter()
        res = pretrain(cfg, tok, run_dir, progress=False)
        meta_path.write_text(json.dumps({"seconds": time.perf_counter() - t, "steps": res.steps,
                                         "users_per_s": res.users_per_s,
                                         "final_loss": float(np.mean(res.losses[-50:]))}))
    return json.loads(meta_path.read_text())


def words_per_user(data) -> dict[str, float]:
    """Mean behaviour words (the sequence's tokens, before the model's length cap) and actions per user."""
    words = sum(float(seg.user_word_offsets[-1]) for seg in data.segments) / max(data.num_users, 1)
    actions = sum(float(seg.user_action_offsets[-1]) for seg in data.segments) / max(data.num_users, 1)
    return {"words_per_user": round(words, 2), "actions_per_user": round(actions, 2)}


DESCRIPTIONS = {
    "completejourney": "Complete Journey 2.0 sample (84.51°, CC0; examples/completejourney): 2,344 households "
                       "with purchases before 2017-11-01 (62k purchase lines, ~16 daily words each).",
    "movielens": "MovieLens-100K (GroupLens; not redistributed, read from --source by examples/movielens): the "
                 "users with ratings before 1998-03-01, one word per day of ratings (days of more than 32 "
                 "ratings split into several words); gender and occupation from the user table.",
    "synthetic": "Synthetic logs (`userbert-engine synth`, {users} users, the demo's world: {genres} genres, "
                 "{shops} shops, seed {seed}).",
}


def dataset_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every dataset script shares (experiment.py, probe.py, search.py: one --work for all)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--source", type=Path, help="movielens: GroupLens' ml-100k directory or zip, or the RecBole wheel")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--work", type=Path, help="data, runs and cached fold results (default: runs/experiment-<dataset>)")
    p.add_argument("--config", type=Path, help="default: examples/configs/<dataset>.toml")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=3000, help="synthetic users")
    p.add_argument("--tasks", help="comma-separated subset of the dataset's tasks")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. finetune.lr=3e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    p = dataset_parser(__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"any of {', '.join(ALL_MODELS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import platform

    import torch

    models = args.models.split(",")
    unknown = sorted(set(models) - set(ALL_MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (known: {', '.join(ALL_MODELS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or ROOT / "runs" / f"experiment-{args.dataset}"
    from cli.common import parse_overrides

    cfg = load_config(args.config or CONFIGS / f"{args.dataset}.toml", parse_overrides(args.set))
    tok, tasks = prepare(args.dataset, work, args.users, args.source)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        tasks = [t for t in tasks if t.name in wanted]
    from tokenizer.shards import open_tokenized

    rules = {"paper": tok}
    if "no_discretisation" in models:
        rules["action"] = tokenize_words(work / "raw", work, "action")
    data = {w: open_tokenized(t) for w, t in rules.items()}
    pre = {w: pretrain_once(cfg, t, work / ("pretrain" if w == "paper" else f"pretrain_{w}")) for w, t in rules.items()}
    ctx = Context(cfg, user_folds(data["paper"].num_users, args.folds, args.seed, cfg.finetune.val_fraction),
                  args.seed, work, 20, data,
                  {w: work / ("pretrain" if w == "paper" else f"pretrain_{w}") / "model" for w in rules})
    mtl = {m: run_mtl(m, tasks, ctx) for m in models if m in MTL_ARCHS}
    results = [run_task(t, ctx, models, mtl) for t in tasks]
    for r in results:  # the multi-task baselines' per-fold values and curves, beside the fine-tuned ones
        for m in mtl:
            r["fold_metrics"][m] = mtl[m][r["spec"].name]["fold_metrics"]
    from common.typed_config import to_dict

    ft = {k: v for k, v in to_dict(cfg.finetune).items() if v not in (None, False, 0) or k == "seed"}
    description = DESCRIPTIONS[args.dataset].format(users=args.users, genres=cfg.demo.genres, shops=cfg.demo.shops,
                                                    seed=cfg.demo.seed)
    meta = {"description": description, "pretrain_steps": pre["paper"]["steps"], "batch_size": cfg.train.batch_size,
            "pretrain_seconds": pre["paper"]["seconds"], "pretrain_final_loss": pre["paper"]["final_loss"],
            "layers": cfg.model.layers, "hidden": cfg.model.hidden, "finetune": json.dumps(ft),
            "words": {w: {**words_per_user(d), "pretrain_seconds": round(pre[w]["seconds"], 1),
                          "pretrain_users_per_s": round(pre[w].get("users_per_s", float("nan")), 1)}
                      for w, d in data.items()},
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
            "command": " ".join(["python examples/experiment.py", *(argv if argv is not None else sys.argv[1:])])}
    write(results, args.dataset, args.out, meta)
    log.info("wrote %s", args.out / f"{args.dataset}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
