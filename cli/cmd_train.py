"""`pretrain`: masked multi-label pretraining, single process."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import add_config_args, load_run_config


def cmd_pretrain(args: argparse.Namespace) -> int:
    from engine.pretrain import pretrain

    cfg = load_run_config(args)
    if args.steps:
        cfg.train.steps = args.steps
    pretrain(cfg, args.data, args.out, progress=not args.quiet)
    return 0


def register(add) -> None:
    sp = add("pretrain", cmd_pretrain, "masked multi-label pretraining (single process; "
             "`deepspeed cli/pretrain.py` for multi-GPU)")
    add_config_args(sp)
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--out", type=Path, required=True, help="run directory")
    sp.add_argument("--steps", type=int, help="override train.steps")
