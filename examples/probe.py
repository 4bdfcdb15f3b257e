"""The embedding-quality benchmark: frozen exported embeddings against counting, and how they grow.

    python examples/probe.py --dataset movielens --source /tmp/recbole/recbole-1.2.1-py3-none-any.whl
    python examples/probe.py --dataset completejourney
    python examples/probe.py --dataset synthetic

Per dataset (prepared and tokenized as examples/experiment.py does, in the same --work directory):

1. Pretrain each *variant* (``paper``: the config as it is; ``bag``: plus the user-level bag objective,
   ``model.user_bag_weight = 1``) on all users, exporting the model at several steps
   (``train.export_steps``), and the ``paper`` variant also on random fractions of the users.  Step 0 is
   the randomly initialised encoder: what the architecture gives before any training.
2. Export every snapshot's embeddings with `userbert-engine embed`'s code (mean pooling), frozen.
3. Score them by engine/downstream/probe.py, K-fold by user (the experiment's folds): a linear probe
   (L2 chosen on validation users) per attribute task, a kNN score per next-item task; the same on the
   count vector (= the logistic-regression baseline on counts) and on counts + embedding.

Writes ``<out>/probe_<dataset>.md`` (tables with bootstrap intervals and paired differences against
counts), ``.json`` and ``probe_<dataset>.png`` (probe metric against pretraining steps and against
the number of pretraining users).  Everything is cached under ``--work``: a rerun only computes what is
missing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from engine.config import RunConfig, load_config  # noqa: E402
from engine.downstream.tasks import PRIMARY_METRIC  # noqa: E402

log = logging.getLogger("userbert")
VARIANTS = {"paper": {}, "bag": {"model.user_bag_weight": 1.0}, "contrast": {"model.contrastive_weight": 1.0}}


def pretrain_variant(cfg_path: Path, sets: dict, tok: Path, run: Path, steps: list[int], users: np.ndarray | None
                     ) -> dict:
    """One pretraining run with snapshots; returns {step: model dir} and the run's seconds."""
    from engine.train.pretrain import pretrain

    done = run / "probe_pretrain.json"
    if not done.exists():
        cfg = load_config(cfg_path, {**sets, "train.steps": max(steps),
                                     "train.export_steps": [s for s in steps if s < max(steps)]})
        t = time.perf_counter()
        res = pretrain(cfg, tok, run, progress=False, users=users, overwrite=True)
        done.write_text(json.dumps({"seconds": time.perf_counter() - t, "users_per_s": res.users_per_s,
                                    "users": None if users is None else len(users)}))
    meta = json.loads(done.read_text())
    meta["models"] = {s: str(run / ("model" if s == max(steps) else f"model_step{s}")) for s in steps}
    return meta


def random_encoder(cfg: RunConfig, tok: Path, out: Path, seed: int) -> Path:
    """Step 0: the untrained encoder, exported like a pretrained one."""
    from engine.config import VocabSpec
    from engine.downstream.finetune import build_encoder
    from engine.model.export import save_model
    from tokenizer.shards import open_tokenized

    if not (out / "model.json").exists():
        spec = VocabSpec.from_manifest(open_tokenized(tok).manifest)
        save_model(out, build_encoder(None, cfg.model, spec, seed=seed), cfg.model, spec, cfg.masking,
                   meta={"steps": 0})
    return out


def embeddings(tok: Path, model_dir: str | Path, cache: Path, data) -> np.ndarray:
    from engine.downstream.probe import read_embeddings
    from engine.downstream.user_embeddings import export_embeddings

    if not cache.exists():
        export_embeddings(tok, model_dir, cache, device="cpu", progress=False, pooling="mean")
    return read_embeddings(cache, data)


def probe_task(spec, data, cfg: RunConfig, emb: np.ndarray | None, feature_sets: tuple[str, ...], folds: int,
               seed: int, cache: Path) -> tuple[object, dict[str, np.ndarray], np.ndarray]:
    """Out-of-fold outputs of each feature set on one task (cached per fold)."""
    from experiment import load_spec, task_split, user_folds

    from engine.downstream.probe import probe_outputs

    td = load_spec(spec, data, cfg)
    splits = [task_split(td.rows, roles) for roles in user_folds(data.num_users, folds, seed,
                                                                 cfg.finetune.val_fraction)]
    width = 20 if td.task == "next" else td.n_outputs
    oof = {f: np.zeros((len(td), width), np.int64 if td.task == "next" else np.float64) for f in feature_sets}
    fold_of = np.zeros(len(td), np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    for f, split in enumerate(splits):
        fold_of[split.test] = f
        todo = [fs for fs in feature_sets if not (cache / f"{fs}_fold{f}.npy").exists()]
        if todo:
            for fs, out in probe_outputs(data, td, split, emb, tuple(todo)).items():
                np.save(cache / f"{fs}_fold{f}.npy", out)
        for fs in feature_sets:
            oof[fs][split.test] = np.load(cache / f"{fs}_fold{f}.npy")
    return td, oof, fold_of


def main(argv: list[str] | None = None) -> int:
    from experiment import dataset_parser

    p = dataset_parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default="paper,bag", help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--steps", default="0,250,500,1000,2000", help="snapshots (0: the untrained encoder)")
    p.add_argument("--fractions", default="0.25,0.5", help="user fractions pretrained on (paper variant)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import torch
    from experiment import CONFIGS, prepare

    from cli.common import parse_overrides
    from tokenizer.shards import open_tokenized

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or ROOT / "runs" / f"experiment-{args.dataset}"
    cfg_path = args.config or CONFIGS / f"{args.dataset}.toml"
    sets = parse_overrides(args.set)
    cfg = load_config(cfg_path, sets)
    tok, tasks = prepare(args.dataset, work, args.users, args.source)
    if args.tasks:
        tasks = [t for t in tasks if t.name in set(args.tasks.split(","))]
    data = open_tokenized(tok)
    steps = sorted({int(s) for s in args.steps.split(",")})
    trained = [s for s in steps if s > 0]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    root = work / "probe"
    runs: dict[str, dict] = {}
    for v in args.variants.split(","):
        runs[v] = pretrain_variant(cfg_path, {**sets, **VARIANTS[v]}, tok, root / f"pretrain_{v}", trained, None)
    rng = np.random.default_rng([args.seed, 77])
    everyone = rng.permutation(data.num_users)
    for frac in fractions:
        users = np.sort(everyone[:max(int(round(frac * data.num_users)), cfg.train.batch_size)])
        runs[f"paper@{frac:g}"] = pretrain_variant(cfg_path, sets, tok, root / f"pretrain_paper_f{frac:g}",
                                                   [max(trained)], users)
    random_dir = random_encoder(cfg, tok, root / "random_encoder", args.seed)

    # Snapshots to score: (variant, steps, users) -> model dir.
    snaps: dict[tuple[str, int, float], str] = {}
    for v in args.variants.split(","):
        for s, d in runs[v]["models"].items():
            snaps[(v, s, 1.0)] = d
        if 0 in steps:
            snaps[(v, 0, 1.0)] = str(random_dir)
    for frac in fractions:
        snaps[("paper", max(trained), frac)] = runs[f"paper@{frac:g}"]["models"][max(trained)]
    final = {v: (v, max(trained), 1.0) for v in args.variants.split(",")}

    from engine.downstream.evaluate import evaluate_outputs

    doc: dict = {"dataset": args.dataset, "tasks": {}, "runs": runs,
                 "command": " ".join(["python examples/probe.py", *(argv if argv is not None else sys.argv[1:])])}
    for spec in tasks:
        cache = work / "probe_cache" / spec.name
        td, oof, fold_of = probe_task(spec, data, cfg, None, ("counts",), args.folds, args.seed, cache / "counts")
        outputs = {"counts": oof["counts"]}
        curve: dict[str, float] = {}
        for key, model_dir in snaps.items():
            v, s, frac = key
            emb = embeddings(tok, model_dir, root / "embeddings" / f"{v}_s{s}_f{frac:g}.parquet", data)
            sets_here = ("embedding", "counts+embedding") if key in final.values() else ("embedding",)
            _, o, _ = probe_task(spec, data, cfg, emb, sets_here, args.folds, args.seed,
                                 cache / f"{v}_s{s}_f{frac:g}")
            report = evaluate_outputs(td, {"e": o["embedding"]}, ks=(10,), n_boot=200, seed=args.seed,
                                      groups=fold_of, compare=[])
            curve[f"{v}|{s}|{frac:g}"] = report.metrics["e"][PRIMARY_METRIC[td.task]].value
            if key in final.values():
                outputs[f"embedding ({v})"] = o["embedding"]
                outputs[f"counts+embedding ({v})"] = o["counts+embedding"]
        compare = [(m, "counts") for m in outputs if m != "counts"]
        report = evaluate_outputs(td, outputs, ks=(10, 20), n_boot=1000, seed=args.seed, groups=fold_of,
                                  compare=compare)
        doc["tasks"][spec.name] = {"task": td.task, "what": spec.what, "labelled": len(td),
                                   "report": report.to_dict(), "curve": curve}
        log.info("%s: %s", spec.name, {m: round(report.metrics[m][PRIMARY_METRIC[td.task]].value, 4)
                                         for m in outputs})
    write(doc, args.out, args.dataset, steps, fractions, data.num_users)
    return 0


def write(doc: dict, out: Path, dataset: str, steps: list[int], fractions: list[float], n_users: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"## Embedding probes: {dataset}", "",
             "Frozen exported embeddings (mean pooling) scored by a linear probe (attribute tasks; L2 chosen on "
             "validation users) or a kNN vote (next-item tasks; k chosen on validation users), against the same "
             "on the count vector (`counts`: the logistic-regression baseline) and on both side by side. "
             f"{n_users} users; out-of-fold over the experiment's folds; 95% bootstrap intervals.", ""]
    for name, t in doc["tasks"].items():
        metric = PRIMARY_METRIC[t["task"]]
        lines.append(f"### {name} ({t['task']}: {t['what']}; {t['labelled']} labelled users)\n")
        lines.append(f"| features | {metric} | - counts [95% interval] (share > 0) |")
        lines.append("|---|---|---|")
        metrics, diffs = t["report"]["metrics"], t["report"]["differences"]
        best = max(metrics, key=lambda m: metrics[m][metric]["value"])
        for m, vals in metrics.items():
            iv = vals[metric]
            cell = f"{iv['value']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"
            cell = f"**{cell}**" if m == best else cell
            d = diffs.get(f"{m} - counts")
            dc = (f"{d[metric]['value']:+.4f} [{d[metric]['low']:+.4f}, {d[metric]['high']:+.4f}] "
                  f"({d[metric + ':p>0']['value']:.2f})") if d else ""
            lines.append(f"| {m} | {cell} | {dc} |")
        lines.append("")
    fig, axes = plt.subplots(2, len(doc["tasks"]), figsize=(4.0 * len(doc["tasks"]), 6.4), dpi=110, squeeze=False)
    for j, (name, t) in enumerate(doc["tasks"].items()):
        metric = PRIMARY_METRIC[t["task"]]
        counts = t["report"]["metrics"]["counts"][metric]["value"]
        variants = sorted({k.split("|")[0] for k in t["curve"]})
        for i, v in enumerate(variants):
            pts = sorted((int(k.split("|")[1]), y) for k, y in t["curve"].items()
                         if k.startswith(f"{v}|") and k.endswith("|1"))
            axes[0, j].plot([s for s, _ in pts], [y for _, y in pts], marker="o", color=f"C{i}", label=v)
        pts = sorted((float(k.split("|")[2]), y) for k, y in t["curve"].items()
                     if k.startswith("paper|") and int(k.split("|")[1]) == max(steps))
        axes[1, j].plot([f * n_users for f, _ in pts], [y for _, y in pts], marker="o", color="C0", label="paper")
        for ax, xl in ((axes[0, j], "pretraining steps"), (axes[1, j], "pretraining users")):
            ax.axhline(counts, linestyle="--", color="grey", label="counts")
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(f"probe {metric}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0, j].set_title(name, fontsize=9)
    fig.suptitle(f"{dataset}: frozen-embedding probe against pretraining steps and users", fontsize=10)
    fig.tight_layout()
    png = out / f"probe_{dataset}.png"
    fig.savefig(png)
    plt.close(fig)
    lines.append(f"![probe curves]({png.name})\n")
    lines.append(f"Reproduce: `{doc['command']}`.\n")
    atomic_write_bytes(out / f"probe_{dataset}.md", "\n".join(lines) + "\n")
    atomic_write_bytes(out / f"probe_{dataset}.json", json.dumps(doc, indent=2, default=str))
    log.info("wrote %s", out / f"probe_{dataset}.md")


if __name__ == "__main__":
    sys.exit(main())
