"""`finetune`, `evaluate` and `embed`: using a pretrained model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import add_config_args, load_run_config


def cmd_finetune(args: argparse.Namespace) -> int:
    from engine.config import VocabSpec
    from engine.finetune import build_encoder, finetune, load_task
    from tokenizer.shards import open_tokenized

    cfg = load_run_config(args)
    data = open_tokenized(args.data)
    td = load_task(args.labels, data, args.task, cfg.finetune.next_attribute)
    encoder = build_encoder(None if args.init == "none" else args.init, cfg.model,
                            VocabSpec.from_manifest(data.manifest))
    if args.freeze_encoder:
        cfg.finetune.freeze_encoder = True
    result = finetune(data, td, cfg.finetune, encoder, out_dir=args.out, device=cfg.train.device,
                      progress=not args.quiet, init_name="scratch" if args.init == "none" else "pretrained",
                      pretrained=args.init != "none")
    print(json.dumps({"best": result.best, "best_epoch": result.best_epoch, "popular": result.popular}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    print("userbert-engine evaluate: not implemented yet — bootstrap confidence intervals and the "
          "logistic-regression baseline arrive with the fine-tuning/evaluation issue. Today, "
          "`userbert-engine finetune` prints validation metrics (AUC, accuracy, mAP@10) and the "
          "most-popular baseline.", file=sys.stderr)
    return 2


def cmd_embed(args: argparse.Namespace) -> int:
    from engine.embed import export_embeddings

    export_embeddings(args.data, args.checkpoint, args.out, batch_size=args.batch_size, device=args.device,
                      progress=not args.quiet)
    return 0


def register(add) -> None:
    sp = add("finetune", cmd_finetune, "fine-tune on a downstream task (first token + task head)")
    add_config_args(sp)
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--labels", type=Path, required=True, help="table of user_id, label")
    sp.add_argument("--task", choices=["binary", "multiclass", "next"], required=True)
    sp.add_argument("--init", required=True, help="pretraining run dir or exported model dir, or 'none' (scratch)")
    sp.add_argument("--out", type=Path, required=True, help="output directory")
    sp.add_argument("--freeze-encoder", action="store_true", help="feature-based mode: train only the head")

    add("evaluate", cmd_evaluate, "evaluate fine-tuned models against baselines (not implemented yet)")

    sp = add("embed", cmd_embed, "write user embeddings (user_id, embedding) to Parquet")
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--checkpoint", type=Path, required=True, help="pretraining run dir or exported model dir")
    sp.add_argument("--out", type=Path, required=True, help="output Parquet file")
    sp.add_argument("--batch-size", type=int, default=512)
    sp.add_argument("--device", default="auto")
