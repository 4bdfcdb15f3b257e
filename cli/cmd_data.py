"""`synth`, `tokenize`, `merge` and `inspect`: raw logs in, shards out, and a look inside."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cli.common import log

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5GiB', '3000000000' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 2G, 512M or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def cmd_synth(args: argparse.Namespace) -> int:
    from tokenizer.synthetic import generate

    summary = generate(args.out, args.users, seed=args.seed, progress=not args.quiet, event_order=args.order)
    log.info("synthetic data in %s: %s", args.out, {k: v for k, v in summary.items() if isinstance(v, int | float)})
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema
    from tokenizer.summary import summary

    schema = load_schema(args.schema)
    vocab = args.vocab
    if vocab is not None and (vocab / "vocab").is_dir():
        vocab = vocab / "vocab"  # a tokenized directory: use its vocabularies
    stats: dict = {}
    manifest = tokenize(schema, args.out, shard_users=args.shard_users, strict=args.strict, progress=not args.quiet,
                        vocab_dir=vocab, workers=args.workers, memory_limit=args.memory_limit,
                        num_shards=args.num_shards, shard_index=args.shard_index, work_dir=args.work_dir,
                        keep_work=args.keep_work, stats=stats)
    print(summary(manifest, stats), file=sys.stderr)
    if args.num_shards > 1:
        log.info("part %d of %d written; run `userbert-engine merge --out %s` once all parts are done",
                 args.shard_index + 1, args.num_shards, args.out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tokenizer.merge import merge_parts

    manifest = merge_parts(args.out, args.parts, verify=args.verify)
    c = manifest["counts"]
    log.info("merged %d shards of %d users into %s", len(manifest["shards"]), c["users"], args.out / "manifest.json")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tokenizer.inspect_user import format_user, user_row
    from tokenizer.shards import open_tokenized

    data = open_tokenized(args.data)
    row = user_row(data, args.user, args.row)
    print(format_user(data, row, args.segment, args.max_words))
    return 0


def register(add) -> None:
    sp = add("synth", cmd_synth, "write synthetic behaviour logs, user table, labels and schema.toml")
    sp.add_argument("--users", type=int, required=True, help="number of users")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", type=Path, required=True, help="output directory")
    sp.add_argument("--order", choices=["user", "time", "shuffle"], default="user",
                    help="row order within each file: by user then time (default), by time like a log, or shuffled")

    sp = add("tokenize", cmd_tokenize, "raw event logs -> behavioural-word shards + manifest + vocabularies")
    sp.add_argument("--schema", type=Path, required=True, help="schema TOML naming the inputs and their columns")
    sp.add_argument("--out", type=Path, required=True, help="output directory (TOKDIR)")
    sp.add_argument("--shard-users", type=int, default=100_000,
                    help="about this many users per shard (shards are 2**k user-hash ranges)")
    sp.add_argument("--strict", action="store_true", help="abort at the first bad row, naming file and row")
    sp.add_argument("--vocab", type=Path,
                    help="reuse vocabularies: an earlier TOKDIR or its vocab/ directory (no counting pass)")
    sp.add_argument("--workers", type=int, default=1, help="threads reading inputs and processing partitions")
    sp.add_argument("--memory-limit", type=parse_size, default="2G",
                    help="peak memory to stay under, e.g. 2G (default), 512M; sizes the spill partitions")
    sp.add_argument("--num-shards", type=int, default=1,
                    help="split the run into K jobs by user hash (one per machine); see `merge`")
    sp.add_argument("--shard-index", type=int, default=0, help="which of the --num-shards jobs this is (0-based)")
    sp.add_argument("--work-dir", type=Path, help="spill and resume files (default: OUT/_work)")
    sp.add_argument("--keep-work", action="store_true", help="keep the work directory after success")

    sp = add("merge", cmd_merge, "join the parts of a `tokenize --num-shards K` run into one manifest")
    sp.add_argument("--out", type=Path, required=True, help="the TOKDIR the jobs wrote to (or will be gathered in)")
    sp.add_argument("parts", type=Path, nargs="*",
                    help="job output directories to gather into --out first (jobs without a shared file system)")
    sp.add_argument("--verify", action="store_true", help="check every shard's sha256")

    sp = add("inspect", cmd_inspect, "print one user's words in readable form, attribute values decoded")
    sp.add_argument("--data", type=Path, required=True, help="a tokenized directory (TOKDIR)")
    sp.add_argument("--user", help="user id (default: the first user)")
    sp.add_argument("--row", type=int, help="user row instead of an id")
    sp.add_argument("--segment", action="append", help="only this segment (repeatable)")
    sp.add_argument("--max-words", type=int, help="show only the last N words of each segment")
