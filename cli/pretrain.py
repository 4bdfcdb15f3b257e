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

from cli.cmd_pretrain import add_train_args, run_pretrain  # noqa: E402
from cli.common import add_config_args, load_run_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(p)
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

    try:
        cfg = load_run_config(args)
        return run_pretrain(cfg, args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # setup errors: one line, no traceback
        if args.verbose:
            raise
        logging.getLogger("userbert").error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
