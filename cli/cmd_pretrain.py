"""`pretrain`: masked multi-label pretraining (the same code path as `deepspeed cli/pretrain.py`)."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from cli.common import add_config_args, load_run_config

if TYPE_CHECKING:
    from engine.config import RunConfig


def add_train_args(sp: argparse.ArgumentParser) -> None:
    """The training flags shared by `userbert-engine pretrain` and cli/pretrain.py."""
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--out", type=Path, required=True, help="run directory")
    sp.add_argument("--steps", type=int, help="override train.steps")
    sp.add_argument("--deepspeed_config", "--deepspeed-config", type=Path, metavar="JSON",
                    help="train on DeepSpeed with this config (configs/ds/*.json); without it: plain torch")
    sp.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                    help="continue from the latest checkpoint in OUT/checkpoints (or from CKPT)")
    sp.add_argument("--overwrite", action="store_true",
                    help="start afresh in an OUT that holds checkpoints of an earlier run (deletes them)")


def run_pretrain(cfg: RunConfig, args: argparse.Namespace) -> int:
    """Train.  Exit status 0; 3 when too many bad steps aborted the run; 128 + the signal number when
    SIGTERM/SIGINT stopped it (after writing a checkpoint)."""
    from engine.train.loop import BadStepsError
    from engine.train.pretrain import TrainingInterrupted, pretrain

    if args.steps:
        cfg.train.steps = args.steps
    resume = True if args.resume == "latest" else args.resume
    try:
        pretrain(cfg, args.data, args.out, progress=not args.quiet, deepspeed_config=args.deepspeed_config,
                 resume=resume or False, overwrite=args.overwrite)
    except BadStepsError as e:  # the message says what happened and how to go on; a traceback adds nothing
        if getattr(args, "verbose", False):
            raise
        logging.getLogger("userbert").error("%s", e)
        return 3
    except TrainingInterrupted as e:
        return 128 + signal.Signals[e.result.stopped].value
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    return run_pretrain(load_run_config(args), args)


def register(add) -> None:
    sp = add("pretrain", cmd_pretrain, "masked multi-label pretraining: one process (plain torch, or DeepSpeed with "
             "--deepspeed_config); several with `deepspeed cli/pretrain.py` or `torchrun cli/pretrain.py`")
    add_config_args(sp)
    add_train_args(sp)
