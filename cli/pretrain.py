"""Pretraining entry point: `python cli/pretrain.py ...` or `deepspeed cli/pretrain.py ...`.

Parse, build, train, close — the logic lives in engine/.  This is the same code path as
`userbert-engine pretrain`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cli.common import parse_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="run config TOML (e.g. configs/paper.toml)")
    p.add_argument("--data", type=Path, required=True, help="tokenized directory")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON config (multi-process training)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    from engine.config import load_config
    from engine.pretrain import pretrain

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or args.deepspeed_config:
        p.error(f"multi-process DeepSpeed training is not wired in yet (WORLD_SIZE={world}): run one process, "
                "or use `userbert-engine pretrain`")
    cfg = load_config(args.config, parse_overrides(args.set))
    pretrain(cfg, args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
