"""The search for what makes pretraining pay off: one config switch per variant, chosen on validation users.

    python examples/search.py --dataset movielens --source /tmp/recbole/recbole-1.2.1-py3-none-any.whl
    python examples/search.py --dataset completejourney --variants reference,mean,cls,lpft,bag

Each *variant* is a set of config overrides on top of examples/configs/<dataset>.toml (``VARIANTS``:
pooling, model size, pretraining length and masking rate, the user-level bag objective, LP-FT, layer-wise
learning-rate decay, a wide count input).  ``reference`` is the config as it is: the paper's recipe.
For every variant, the experiment's recipe (examples/experiment.py, the same folds by user, in the same
``--work``) fine-tunes the pretrained encoder (``pretrained``) and, where the variant changes the model or
the fine-tuning, the same architecture from scratch (``scratch``) on every task.  Variants that change
only pretraining share one scratch run; variants that change only fine-tuning share one pretraining.

**Nothing is chosen on test users.**  In each fold, the variant with the best validation metric (the
chosen epoch's, on that fold's validation users) is picked, separately for ``pretrained`` and for
``scratch``, and its predictions of that fold's test users are used: ``tuned`` and ``scratch_tuned``
are nested choices, so their out-of-fold metrics are honest estimates of "search, then deploy".

Writes ``<out>/search_<dataset>.md`` and ``.json``: the validation metric of every variant, the variant
each fold chose, and the test metrics of reference, tuned, scratch (reference and tuned) and logistic
regression on counts, with bootstrap intervals and paired differences.  Cached under ``--work``.
"""

from __future__ import annotations

import hashlib
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

VARIANTS: dict[str, dict] = {
    "reference": {},
    # pooling of the user state for fine-tuning
    "cls": {"finetune.pooling": "cls"},
    "mean": {"finetune.pooling": "mean"},
    "attention": {"finetune.pooling": "attention"},
    "last2": {"finetune.pool_layers": 2},
    # fine-tuning that cannot lose to its own frozen encoder
    "lpft": {"finetune.probe_epochs": 3},
    "llrd": {"finetune.layer_lr_decay": 0.7},
    "wide": {"finetune.wide": True},
    # pretraining: a user-level objective, masking rate, length
    "bag": {"model.user_bag_weight": 1.0},
    "contrast": {"model.contrastive_weight": 1.0},
    "mask30": {"masking.select_prob": 0.3},
    "steps250": {"train.steps": 250, "train.warmup_steps": 25},  # the probes peak early (docs/results/probe_*)
    "steps500": {"train.steps": 500, "train.warmup_steps": 50},
    "steps8k": {"train.steps": 8000},
    # the two best single switches on MovieLens gender's validation users, together
    "bag_wide": {"model.user_bag_weight": 1.0, "finetune.wide": True},
    # model size for small data
    "small": {"model.hidden": 32, "model.layers": 1, "model.heads": 2},
    "deep": {"model.layers": 4},
}
PRETRAIN_PARTS = ("model", "masking", "train")
SCRATCH_PARTS = ("model", "finetune")


def _key(cfg: RunConfig, parts: tuple[str, ...]) -> str:
    from common.typed_config import to_dict

    doc = {p: to_dict(getattr(cfg, p)) for p in parts}
    if parts == SCRATCH_PARTS:
        for key in ("user_bag_weight", "contrastive_weight", "contrastive_keep", "contrastive_temperature"):
            doc["model"].pop(key, None)  # pretraining objectives: nothing of them reaches a scratch run
    doc = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:10]


def applies(variant: dict, task: str) -> bool:
    """A wide count input is for attribute tasks (next-item scores go through the fused CE on h only)."""
    return not (variant.get("finetune.wide") and task == "next")


def fold_validation(hist: list[dict], metric: str) -> float:
    """The chosen epoch's validation metric of one fold's fine-tuning history (what the epoch was chosen on)."""
    vals = [h[f"val.{metric}"] for h in hist if f"val.{metric}" in h and np.isfinite(h[f"val.{metric}"])]
    return max(vals) if vals else -np.inf


def nested_choice(runs: dict[str, dict], model: str, metric: str, n_folds: int) -> tuple[np.ndarray, list[str]]:
    """Per fold, the variant whose ``model`` has the best validation metric; its test outputs, out of fold."""
    names = [v for v in runs if model in runs[v]["oof"]]
    first = runs[names[0]]
    oof = np.zeros_like(first["oof"][model])
    chosen = []
    for f in range(n_folds):
        scores = {v: fold_validation(runs[v]["histories"][model][f], metric) for v in names}
        best = max(names, key=lambda v: (scores[v], v == "reference"))  # ties: the reference
        chosen.append(best)
        test = first["fold_of"] == f
        oof[test] = runs[best]["oof"][model][test]
    return oof, chosen


def search_task(spec, variants: list[str], base_sets: dict, cfg_path: Path, work: Path, tok: Path, data,
                folds: int, seed: int) -> dict:
    import experiment as exp

    from engine.downstream.evaluate import evaluate_outputs

    base = load_config(cfg_path, base_sets)
    roles = exp.user_folds(data.num_users, folds, seed, base.finetune.val_fraction)
    ref_pre = _key(base, PRETRAIN_PARTS)
    pre_dirs = {ref_pre: work / "pretrain"}  # the experiment's own pretraining and fold caches are the reference's
    scratch_owner: dict[str, str] = {}
    runs: dict[str, dict] = {}
    for v in variants:
        if not applies(VARIANTS[v], spec.task):
            continue
        cfg = load_config(cfg_path, {**base_sets, **VARIANTS[v]})
        pk, sk = _key(cfg, PRETRAIN_PARTS), _key(cfg, SCRATCH_PARTS)
        pre_dir = pre_dirs.setdefault(pk, work / "search" / f"pretrain_{v}")
        pre_meta = exp.pretrain_once(cfg, tok, pre_dir)
        models = ["pretrained"] + (["scratch"] if sk not in scratch_owner else [])
        scratch_owner.setdefault(sk, v)
        if v == "reference":
            models.append("logreg")
        ctx = exp.Context(cfg, roles, seed, work if v == "reference" else work / "search" / v, 20, {"paper": data},
                          {"paper": pre_dir / "model"})
        t = time.perf_counter()
        r = exp.run_task(spec, ctx, models, {})
        log.info("search %s %s: %s (%.0f s)", spec.name, v, ", ".join(models), time.perf_counter() - t)
        runs[v] = {"oof": r["oof"], "histories": r["histories"], "fold_of": r["fold_of"], "td": r["td"],
                   "pretrain_seconds": pre_meta["seconds"], "report": r["report"]}
    metric = PRIMARY_METRIC[spec.task]
    ref = runs["reference"]
    td, fold_of = ref["td"], ref["fold_of"]
    tuned, chosen = nested_choice(runs, "pretrained", metric, folds)
    scratch_tuned, scratch_chosen = nested_choice(runs, "scratch", metric, folds)
    outputs = {"reference": ref["oof"]["pretrained"], "tuned": tuned, "scratch": ref["oof"]["scratch"],
               "scratch_tuned": scratch_tuned, "logreg": ref["oof"]["logreg"]}
    report = evaluate_outputs(td, outputs, ks=(10, 20), n_boot=1000, seed=seed, groups=fold_of,
                              compare=[("tuned", "scratch_tuned"), ("tuned", "reference"), ("tuned", "logreg"),
                                       ("reference", "scratch"), ("scratch_tuned", "logreg")])
    validation = {v: {m: float(np.mean([fold_validation(h, metric) for h in r["histories"][m]]))
                      for m in r["histories"]} for v, r in runs.items()}
    return {"task": spec.task, "metric": metric, "validation": validation, "chosen": chosen,
            "scratch_chosen": scratch_chosen, "report": report, "labelled": len(td)}


def write(results: dict[str, dict], dataset: str, out: Path, meta: dict) -> None:
    from common.atomic import atomic_write_bytes

    lines = [f"## Search: {dataset}", "",
             "Each variant is one switch on top of the run config (examples/search.py `VARIANTS`); `reference` is "
             "the paper's recipe. Validation metric: the chosen epoch's, on each fold's validation users, mean over "
             "folds. `tuned` / `scratch_tuned`: in each fold the variant with the best validation metric, its test "
             "predictions (a nested choice: no test user is looked at).", ""]
    for name, r in results.items():
        metric = r["metric"]
        lines += [f"### {name} ({r['task']}, {r['labelled']} labelled users): validation {metric}", "",
                  "| variant | pretrained | scratch |", "|---|---|---|"]
        for v, val in r["validation"].items():
            cells = [f"{val[m]:.4f}" if m in val else "(= reference)" for m in ("pretrained", "scratch")]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines += ["", f"Chosen per fold: pretrained {r['chosen']}; scratch {r['scratch_chosen']}.", ""]
        metrics = {"next": ["map@10", "recall@10", "ndcg@10"], "binary": ["auc", "accuracy"],
                   "multiclass": ["accuracy", "macro_f1", "auc"]}[r["task"]]
        lines.append(r["report"].markdown(metrics, title=f"{name}: test, out of fold"))
    lines.append(f"\nReproduce: `{meta['command']}` ({meta['machine']}; this invocation {meta['seconds']:.0f} s, "
                 "results cached by earlier invocations in the same --work not counted again).\n")
    doc = {"dataset": dataset, "meta": meta,
           "tasks": {n: {**{k: v for k, v in r.items() if k != "report"}, "report": r["report"].to_dict()}
                     for n, r in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"search_{dataset}.md", "\n".join(lines) + "\n")
    atomic_write_bytes(out / f"search_{dataset}.json", json.dumps(doc, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    import experiment as exp

    p = exp.dataset_parser(__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import platform

    import torch

    from cli.common import parse_overrides
    from tokenizer.shards import open_tokenized

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = sorted(set(args.variants.split(",")), key=list(VARIANTS).index)  # reference first: it owns scratch
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "reference" not in variants:
        raise SystemExit(f"--variants: unknown {unknown} or no 'reference' (known: {', '.join(VARIANTS)})")
    work = args.work or ROOT / "runs" / f"experiment-{args.dataset}"
    cfg_path = args.config or exp.CONFIGS / f"{args.dataset}.toml"
    sets = parse_overrides(args.set)
    tok, tasks = exp.prepare(args.dataset, work, args.users, args.source)
    if args.tasks:
        tasks = [t for t in tasks if t.name in set(args.tasks.split(","))]
    data = open_tokenized(tok)
    t = time.perf_counter()
    results = {spec.name: search_task(spec, variants, sets, cfg_path, work, tok, data, args.folds, args.seed)
               for spec in tasks}
    meta = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
            "seconds": time.perf_counter() - t, "variants": {v: VARIANTS[v] for v in variants},
            "command": " ".join(["python examples/search.py", *(argv if argv is not None else sys.argv[1:])])}
    write(results, args.dataset, args.out, meta)
    log.info("wrote %s", args.out / f"search_{args.dataset}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
