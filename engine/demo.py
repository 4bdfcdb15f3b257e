"""`userbert-engine demo`: the whole pipeline on synthetic data, on a CPU, in a few minutes.

synth -> tokenize -> pretrain -> fine-tune each task with and without pretraining, plus the
most-popular baseline -> a results table, report.md and the loss curve PNG.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import RunConfig, VocabSpec
from engine.downstream.finetune import FinetuneResult, build_encoder, finetune
from engine.downstream.tasks import PRIMARY_METRIC, load_task
from engine.train.pretrain import pretrain
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate

log = logging.getLogger("userbert")

# (task name, label file written by synth, task type)
DEMO_TASKS = [
    ("next_genre", "next_genre.parquet", "next"),
    ("is_parent", "is_parent.parquet", "binary"),
    ("targeting", "targeting.parquet", "binary"),
]


@dataclass
class DemoResult:
    rows: list[dict]  # one per (task, model) with its metrics
    report: Path
    seconds: dict[str, float]


def run_demo(cfg: RunConfig, out_dir: str | Path, *, work_dir: str | Path | None = None,
             progress: bool = True) -> DemoResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="userbert-demo-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        t = time.perf_counter()
        generate(work / "raw", cfg.demo.users, seed=cfg.demo.seed, n_genres=cfg.demo.genres, n_shops=cfg.demo.shops,
                 progress=progress)
        seconds["synth"] = time.perf_counter() - t

        t = time.perf_counter()
        schema = load_schema(work / "raw" / "schema.toml")
        tokenize(schema, work / "tok", shard_users=cfg.demo.shard_users, progress=progress)
        seconds["tokenize"] = time.perf_counter() - t

        t = time.perf_counter()
        pre = pretrain(cfg, work / "tok", out_dir / "pretrain", progress=progress)
        seconds["pretrain"] = time.perf_counter() - t

        t = time.perf_counter()
        data = open_tokenized(work / "tok")
        rows = []
        for name, file, task in DEMO_TASKS:
            td = load_task(work / "raw" / "labels" / file, data, task, cfg.finetune.next_attribute)
            results: dict[str, FinetuneResult] = {}
            for init_name, init in (("pretrained", pre.model_dir), ("scratch", None)):
                encoder = build_encoder(init, cfg.model, VocabSpec.from_manifest(data.manifest),
                                        seed=cfg.finetune.seed)
                results[init_name] = finetune(data, td, cfg.finetune, encoder, device=cfg.train.device,
                                              progress=progress, init_name=init_name, pretrained=init is not None)
            sizes = results["pretrained"].sizes
            for init_name, r in results.items():
                rows.append({"task": name, "type": task, "model": init_name, "n_train": sizes["train"],
                             "n_val": sizes["val"], "n_test": sizes["test"], "best_epoch": r.best_epoch, **r.best})
            rows.append({"task": name, "type": task, "model": "popular", "n_train": sizes["train"],
                         "n_val": sizes["val"], "n_test": sizes["test"], **results["pretrained"].popular})
        seconds["finetune"] = time.perf_counter() - t
        report = write_report(out_dir, rows, pre, seconds, cfg)
    return DemoResult(rows, report, seconds)


def results_table(rows: list[dict]) -> str:
    """Markdown table: task x model x metrics."""
    metrics = [m for m in ("map@10", "auc", "accuracy") if any(m in r for r in rows)]
    head = "| task | model | " + " | ".join(metrics) + " | train / val / test users |"
    sep = "|---|---|" + "---|" * (len(metrics) + 1)
    lines = [head, sep]
    for r in rows:
        cells = [f"{r[m]:.4f}" if m in r else "—" for m in metrics]
        sizes = f"{r['n_train']} / {r['n_val']} / {r.get('n_test', 0)}"
        lines.append(f"| {r['task']} | {r['model']} | " + " | ".join(cells) + f" | {sizes} |")
    return "\n".join(lines)


def write_report(out_dir: Path, rows: list[dict], pre, seconds: dict[str, float], cfg: RunConfig) -> Path:
    table = results_table(rows)
    lift = _next_lift(rows)
    text = f"""# userbert-engine demo report

Synthetic data: {cfg.demo.users} users, seed {cfg.demo.seed}. Model: L={cfg.model.layers}, H={cfg.model.hidden},
A={cfg.model.heads}. Pretraining: {pre.steps} steps of {cfg.train.batch_size} users
({pre.users_per_s:.0f} users/s on this machine).

Primary metrics: {", ".join(f"{t}: {m}" for t, m in PRIMARY_METRIC.items())}. "popular" ranks by training-label
frequency (next) or predicts the prior (binary: AUC 0.5 by construction).

{table}

{lift}

![pretraining loss](pretrain/loss.png)

Stage times (s): {", ".join(f"{k} {v:.1f}" for k, v in seconds.items())}
"""
    path = out_dir / "report.md"
    path.write_text(text)
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2))
    return path


def _next_lift(rows: list[dict]) -> str:
    by = {r["model"]: r.get("map@10") for r in rows if r["task"] == "next_genre"}
    if not by.get("popular") or by.get("pretrained") is None:
        return ""
    return (f"Next-genre mAP@10: pretrained {by['pretrained']:.4f}, scratch {by['scratch']:.4f}, "
            f"popular {by['popular']:.4f} ({by['pretrained'] / by['popular']:.2f}x popular).")
