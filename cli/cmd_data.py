"""`synth` and `tokenize`: raw logs in, shards out."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import log


def cmd_synth(args: argparse.Namespace) -> int:
    from tokenizer.synthetic import generate

    summary = generate(args.out, args.users, seed=args.seed, progress=not args.quiet)
    log.info("synthetic data in %s: %s", args.out, {k: v for k, v in summary.items() if isinstance(v, int | float)})
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema

    schema = load_schema(args.schema)
    manifest = tokenize(schema, args.out, shard_users=args.shard_users, strict=args.strict,
                        progress=not args.quiet, vocab_dir=args.vocab)
    c = manifest["counts"]
    log.info("tokenized %d users into %s (%d shards); dropped rows: %s", c["users"], args.out,
             len(manifest["shards"]), manifest["dropped"])
    return 0


def register(add) -> None:
    sp = add("synth", cmd_synth, "write synthetic behaviour logs, user table, labels and schema.toml")
    sp.add_argument("--users", type=int, required=True, help="number of users")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", type=Path, required=True, help="output directory")

    sp = add("tokenize", cmd_tokenize, "raw event logs -> behavioural-word shards + manifest + vocabularies")
    sp.add_argument("--schema", type=Path, required=True, help="schema TOML naming the inputs and their columns")
    sp.add_argument("--out", type=Path, required=True, help="output directory (TOKDIR)")
    sp.add_argument("--shard-users", type=int, default=100_000, help="users per shard")
    sp.add_argument("--strict", action="store_true", help="abort at the first bad row, naming file and row")
    sp.add_argument("--vocab", type=Path, help="reuse the vocabularies of an earlier tokenized directory")
