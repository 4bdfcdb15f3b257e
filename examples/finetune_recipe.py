"""Compare fine-tuning recipes on the demo's data, over several splits (the is_parent investigation).

    python examples/finetune_recipe.py --task is_parent --variants '{"cls": {"pooling": "cls"}, "mean": {}}' \
        --seeds 0,1,2 --inits pretrained,scratch

Builds (once, under ``--work``) the demo's synthetic data, tokenizes and pretrains it with
configs/demo.toml, then fine-tunes every variant (``finetune.*`` overrides on top of the demo
config) from the pretrained model and/or from scratch, once per seed (each seed is another
70/10/20 split and another initialisation), and prints one JSON line per run and a markdown
table: the mean test metric over seeds with its standard error, and the per-seed values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import VocabSpec, load_config  # noqa: E402
from engine.downstream.finetune import build_encoder, finetune  # noqa: E402
from engine.downstream.tasks import PRIMARY_METRIC, load_task  # noqa: E402

TASKS = {"is_parent": "binary", "targeting": "binary", "next_genre": "next"}


def prepare(work: Path, progress: bool = False) -> tuple[Path, Path, Path]:
    from engine.train.pretrain import pretrain
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema
    from tokenizer.synthetic import generate

    cfg = load_config(ROOT / "configs" / "demo.toml")
    raw, tok, run = work / "raw", work / "tok", work / "pretrain"
    if not (raw / "schema.toml").exists():
        generate(raw, cfg.demo.users, seed=cfg.demo.seed, n_genres=cfg.demo.genres, n_shops=cfg.demo.shops,
                 progress=progress)
    if not (tok / "manifest.json").exists():
        tokenize(load_schema(raw / "schema.toml"), tok, shard_users=cfg.demo.shard_users, progress=progress)
    if not (run / "model" / "model.json").exists():
        pretrain(cfg, tok, run, progress=progress)
    return raw, tok, run / "model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="is_parent")
    p.add_argument("--variants", default='{"default": {}}', help="JSON: name -> {finetune key: value}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--inits", default="pretrained,scratch")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "finetune-recipe")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    from tokenizer.shards import open_tokenized

    if args.threads:
        torch.set_num_threads(args.threads)
    raw, tok, model_dir = prepare(args.work)
    data = open_tokenized(tok)
    spec = VocabSpec.from_manifest(data.manifest)
    task = TASKS[args.task]
    metric = PRIMARY_METRIC[task]
    td = load_task(raw / "labels" / f"{args.task}.parquet", data, task)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name, over in json.loads(args.variants).items():
        for init in args.inits.split(","):
            values = []
            for seed in seeds:
                cfg = load_config(ROOT / "configs" / "demo.toml",
                                  {**{f"finetune.{k}": v for k, v in over.items()}, "finetune.seed": seed})
                t = time.perf_counter()
                enc = build_encoder(model_dir if init == "pretrained" else None, cfg.model, spec, seed=seed)
                r = finetune(data, td, cfg.finetune, enc, device="cpu", progress=False, init_name=init,
                             pretrained=init == "pretrained")
                values.append(r.test[metric])
                print(json.dumps({"variant": name, "init": init, "seed": seed, "test": round(r.test[metric], 4),
                                  "val": round(r.val[metric], 4), "best_epoch": r.best_epoch,
                                  "seconds": round(time.perf_counter() - t, 1),
                                  "test_curve": [round(h[f"test.{metric}"], 4) for h in r.history]}), flush=True)
            v = np.array(values)
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            rows.append(f"| {name} | {init} | {v.mean():.4f} ± {se:.4f} | {', '.join(f'{x:.4f}' for x in v)} |")
    print(f"\n{args.task}: test {metric}, mean ± standard error over seeds {args.seeds} (each seed: another split)\n")
    print("| variant | init | mean | per seed |\n|---|---|---|---|\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
