"""`demo`: the whole pipeline on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import add_config_args, load_run_config


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import results_table, run_demo

    cfg = load_run_config(args, default="demo")
    if args.users:
        cfg.demo.users = args.users
    result = run_demo(cfg, args.out, progress=not args.quiet)
    print()
    print(results_table(result.rows))
    print()
    print(f"report: {result.report}  (loss curve: {result.report.parent / 'pretrain' / 'loss.png'})")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return 0


def register(add) -> None:
    sp = add("demo", cmd_demo, "the whole pipeline on synthetic data, on a CPU, in a few minutes")
    add_config_args(sp)
    sp.add_argument("--out", type=Path, default=Path("demo-out"), help="where the report goes (default: demo-out)")
    sp.add_argument("--users", type=int, help="override demo.users")
