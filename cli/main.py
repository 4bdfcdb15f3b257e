"""The `userbert-engine` console script: thin glue from arguments to engine/ and tokenizer/ calls.

Each group of subcommands lives in its own module (cli/cmd_*.py) with a ``register(add)`` function.
"""

from __future__ import annotations

import argparse
import sys

from cli import cmd_data, cmd_demo, cmd_downstream, cmd_pretrain
from cli.common import log, parse_overrides, setup_logging

__all__ = ["build_parser", "main", "parse_overrides"]

COMMAND_MODULES = [cmd_data, cmd_pretrain, cmd_downstream, cmd_demo]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userbert-engine",
                                description="UserBERT: pretraining user representations from behaviour logs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return sp

    for module in COMMAND_MODULES:
        module.register(add)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from common.typed_config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
