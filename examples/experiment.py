"""The results recipe: pretrain -> fine-tune (pretrained and scratch) -> baselines -> tables and curves.

    python examples/experiment.py --dataset completejourney --out docs/results
    python examples/experiment.py --dataset synthetic --out docs/results

Per dataset: prepare the data (Complete Journey: examples/completejourney/convert.py; synthetic:
`userbert-engine synth` with the demo's settings), tokenize, pretrain once with
examples/configs/<dataset>.toml, then for every task run K-fold cross-validation by user: each
fold is the test set once; of the other users, ``finetune.val_fraction`` pick the epoch and the
rest train.  Every model and baseline gets one out-of-fold prediction per labelled user, so the
bootstrap intervals are over all labelled users rather than one 20% test split, and the paired
differences (pretrained - scratch, ...) use the same resamples.

Models: ``pretrained`` (the pretrained encoder, fine-tuned end to end), ``scratch`` (the same
architecture and recipe without pretraining), ``frozen`` (the pretrained encoder frozen, a
linear head: what pretraining alone put into the representation), and the baselines
``popular``, ``history`` (next-item only) and ``logreg``.

Writes ``<out>/<dataset>.md`` (tables), ``<out>/<dataset>.json`` (all numbers, per-fold values,
settings) and ``<out>/<dataset>_<task>.png`` (test metric per fine-tuning epoch, mean over folds,
with the baselines as dashed lines).  Intermediate results are cached under ``--work``, so an
interrupted run resumes where it stopped.
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
from engine.downstream.evaluate import baseline_outputs, evaluate_outputs, metric_names  # noqa: E402
from engine.downstream.finetune import build_encoder, finetune, predict  # noqa: E402
from engine.downstream.tasks import (  # noqa: E402
    PRIMARY_METRIC,
    Split,
    load_task,  # noqa: E402
    split_indices,
)

log = logging.getLogger("userbert")
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class TaskSpec:
    name: str
    labels: Path
    task: str
    what: str


def prepare(dataset: str, work: Path, users: int) -> tuple[Path, list[TaskSpec]]:
    """Raw data -> tokenized directory; the tasks and their label tables."""
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema

    raw = work / "raw"
    if dataset == "completejourney":
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
    tok = work / "tok"
    if not (tok / "manifest.json").exists():
        tokenize(load_schema(raw / "schema.toml"), tok, progress=False)
    return tok, tasks


def kfold(n: int, folds: int, seed: int, val_fraction: float) -> list[Split]:
    """Fold f is the test set once; val_fraction of all users, from the rest, picks the epoch."""
    perm = np.random.default_rng([seed, 4242]).permutation(n)
    parts = np.array_split(perm, folds)
    out = []
    for f in range(folds):
        test = np.sort(parts[f])
        rest = np.sort(np.concatenate([parts[g] for g in range(folds) if g != f]))
        inner = split_indices(len(rest), val_fraction * n / len(rest), seed + f)
        out.append(Split(rest[inner.train], rest[inner.val], test))
    return out


def run_task(spec: TaskSpec, data, cfg: RunConfig, pre_dir: Path, work: Path, folds: int, seed: int,
             models: list[str], k: int) -> dict:
    td = load_task(spec.labels, data, spec.task, cfg.finetune.next_attribute)
    models = [m for m in models if m != "history" or td.task == "next"]  # own-history ranks items only
    splits = kfold(len(td), folds, seed, cfg.finetune.val_fraction)
    vocab = VocabSpec.from_manifest(data.manifest)
    cache = work / "cache" / spec.name
    _check_cache(cache / "settings.json", {"finetune": cfg.finetune, "model": cfg.model, "folds": folds,
                                           "seed": seed, "k": k, "labelled": len(td)})
    width = k if td.task == "next" else td.n_outputs
    oof = {m: np.zeros((len(td), width), np.float64 if td.task != "next" else np.int64) for m in models}
    histories: dict[str, list[list[dict]]] = {m: [] for m in models if m in ("pretrained", "scratch", "frozen")}
    fold_metrics: dict[str, list[dict]] = {m: [] for m in models}
    from engine.data.collate import CollateConfig, Collator
    from engine.model.userbert import user_attr_offsets
    from engine.train.distributed import resolve_device

    collator = Collator(data, user_attr_offsets(vocab), CollateConfig(select_prob=0.0))
    dev = resolve_device(cfg.train.device)
    for f, split in enumerate(splits):
        test = td.subset(split.test)
        for m in models:
            path = cache / f"{m}_fold{f}.npz"
            if path.exists():
                z = np.load(path, allow_pickle=False)
                out = z["out"]
                hist = json.loads(str(z["history"]))
            elif m in ("pretrained", "scratch", "frozen"):
                ft = _ft_for(cfg, m, seed + f)
                init = None if m == "scratch" else pre_dir
                t = time.perf_counter()
                enc = build_encoder(init, cfg.model, vocab, seed=seed + f)
                res = finetune(data, td, ft, enc, split=split, device=cfg.train.device, progress=False,
                               init_name=m, pretrained=init is not None)
                out = predict(res.model, collator, test.rows, 256, dev, k=k)[0]
                hist = res.history
                log.info("%s %s fold %d: best epoch %d, test %s %.4f (%.0f s)", spec.name, m, f, res.best_epoch,
                         PRIMARY_METRIC[td.task], res.test.get(PRIMARY_METRIC[td.task], float("nan")),
                         time.perf_counter() - t)
                np.savez(path, out=out, history=json.dumps(hist))
            else:
                out = baseline_outputs(data, td, split, (m,), cfg.finetune.next_attribute, k=k)[m]
                hist = []
                np.savez(path, out=out, history=json.dumps(hist))
            oof[m][split.test] = out
            if m in histories:
                histories[m].append(hist)
            from engine.downstream.metrics import task_metrics

            fold_metrics[m].append(task_metrics(test, out, (10,)))
    fold_of = np.zeros(len(td), np.int64)
    for f, split in enumerate(splits):
        fold_of[split.test] = f
    report = evaluate_outputs(td, oof, ks=(10, 20), n_boot=1000, seed=seed, groups=fold_of,
                              compare=[(a, b) for a, b in (("pretrained", "scratch"), ("pretrained", "popular"),
                                                           ("pretrained", "history"), ("pretrained", "logreg"),
                                                           ("scratch", "popular"), ("frozen", "popular"),
                                                           ("logreg", "popular"))
                                       if a in models and b in models])
    return {"spec": spec, "td": td, "report": report, "histories": histories, "fold_metrics": fold_metrics,
            "sizes": {"labelled": len(td), "folds": folds, **splits[0].sizes()}}


def _check_cache(path: Path, settings: dict) -> None:
    """Cached fold results are only reused under the settings that made them (another --set: another --work)."""
    from common.typed_config import to_dict

    doc = json.loads(json.dumps({k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v
                                 for k, v in settings.items()}, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = json.loads(path.read_text())
        if old != doc:
            diff = sorted(k for k in set(old) | set(doc) if old.get(k) != doc.get(k))
            raise SystemExit(f"{path.parent}: cached fold results were made with other settings ({', '.join(diff)} "
                             "differ); pass another --work, or delete that directory to recompute")
    else:
        path.write_text(json.dumps(doc, indent=2))


def _ft_for(cfg: RunConfig, model: str, seed: int):
    import copy

    ft = copy.deepcopy(cfg.finetune)
    ft.seed = seed
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


MODEL_ORDER = ("pretrained", "scratch", "frozen", "popular", "history", "logreg")


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
    doc: dict = {"dataset": dataset, "meta": meta, "tasks": {}}
    for r in results:
        spec, report = r["spec"], r["report"]
        metrics = metric_names(spec.task, (10, 20)) if spec.task == "next" else ["auc", "accuracy"]
        if spec.task == "next":
            metrics = ["map@10", "recall@10", "ndcg@10", "recall@20"]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["completejourney", "synthetic"], required=True)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--work", type=Path, help="data, runs and cached fold results (default: runs/experiment-<dataset>)")
    p.add_argument("--config", type=Path, help="default: examples/configs/<dataset>.toml")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=3000, help="synthetic users")
    p.add_argument("--tasks", help="comma-separated subset of the dataset's tasks")
    p.add_argument("--models", default="pretrained,scratch,frozen,popular,history,logreg")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. finetune.lr=3e-4")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import platform

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or ROOT / "runs" / f"experiment-{args.dataset}"
    from cli.common import parse_overrides

    cfg = load_config(args.config or CONFIGS / f"{args.dataset}.toml", parse_overrides(args.set))
    tok, tasks = prepare(args.dataset, work, args.users)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        tasks = [t for t in tasks if t.name in wanted]
    run_dir = work / "pretrain"
    meta_path = run_dir / "experiment_pretrain.json"
    if meta_path.exists():
        from common.typed_config import to_dict

        saved = json.loads((run_dir / "config.json").read_text())
        for part in ("model", "masking", "train"):
            if saved[part] != json.loads(json.dumps(to_dict(getattr(cfg, part)), default=str)):
                raise SystemExit(f"{run_dir}: pretrained with other [{part}] settings than this run's config; "
                                 "pass another --work, or delete that directory to pretrain again")
    else:
        from engine.train.pretrain import pretrain

        t = time.perf_counter()
        res = pretrain(cfg, tok, run_dir, progress=False)
        meta_path.write_text(json.dumps({"seconds": time.perf_counter() - t, "steps": res.steps,
                                         "final_loss": float(np.mean(res.losses[-50:]))}))
    pre_meta = json.loads(meta_path.read_text())
    from tokenizer.shards import open_tokenized

    data = open_tokenized(tok)
    models = args.models.split(",")
    results = [run_task(t, data, cfg, run_dir / "model", work, args.folds, args.seed, models, 20) for t in tasks]
    from common.typed_config import to_dict

    ft = {k: v for k, v in to_dict(cfg.finetune).items() if v not in (None, False, 0) or k == "seed"}
    description = {
        "completejourney": "Complete Journey 2.0 sample (84.51°, CC0; examples/completejourney): 2,344 households "
                           "with purchases before 2017-11-01 (62k purchase lines, ~16 daily words each).",
        "synthetic": f"Synthetic logs (`userbert-engine synth`, {args.users} users, the demo's world: "
                     f"{cfg.demo.genres} genres, {cfg.demo.shops} shops, seed {cfg.demo.seed}).",
    }[args.dataset]
    meta = {"description": description, "pretrain_steps": pre_meta["steps"], "batch_size": cfg.train.batch_size,
            "pretrain_seconds": pre_meta["seconds"], "pretrain_final_loss": pre_meta["final_loss"],
            "layers": cfg.model.layers, "hidden": cfg.model.hidden, "finetune": json.dumps(ft),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
            "command": " ".join(["python examples/experiment.py", *(argv if argv is not None else sys.argv[1:])])}
    write(results, args.dataset, args.out, meta)
    log.info("wrote %s", args.out / f"{args.dataset}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
