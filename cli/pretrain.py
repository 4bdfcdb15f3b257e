"""Pretraining entry point for launchers: `deepspeed [--num_gpus N] [--hostfile H] cli/pretrain.py ...`,
`torchrun --nproc_per_node N cli/pretrain.py ...`, or `python cli/pretrain.py ...`.

Parse, build, train, close — the logic lives in engine/.  This is the same code path as
`userbert-engine pretrain` (which takes the same training flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cli.cmd_train import add_train_args, run_pretrain  # noqa: E402
from cli.common import parse_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="run config TOML (e.g. configs/paper.toml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. train.steps=1000")
    add_train_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, DeepSpeed's included")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")

    from common.typed_config import ConfigError
    from engine.config import load_config

    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        return run_pretrain(cfg, args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # setup errors: one line, no traceback
        if args.verbose:
            raise
        logging.getLogger("userbert").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
