"""The `userbert-engine` console script: thin glue from arguments to engine/ and tokenizer/ calls."""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("userbert")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set model.layers=2 train.lr=3e-4`` -> {"model.layers": 2, "train.lr": 0.0003} (TOML values)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. --set model.layers=2")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word is a string
    return out


def default_config_path(name: str) -> Path:
    """A config shipped with the package (configs/<name>.toml)."""
    return Path(str(resources.files("configs") / f"{name}.toml"))


def _load_config(args: argparse.Namespace, default: str | None = None):
    from engine.config import load_config

    path = args.config or (default_config_path(default) if default else None)
    return load_config(path, parse_overrides(args.set))


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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from engine.pretrain import pretrain

    cfg = _load_config(args)
    if args.steps:
        cfg.train.steps = args.steps
    pretrain(cfg, args.data, args.out, progress=not args.quiet)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import json

    from engine.config import VocabSpec
    from engine.finetune import build_encoder, finetune, load_task
    from tokenizer.shards import open_tokenized

    cfg = _load_config(args)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import results_table, run_demo

    cfg = _load_config(args, default="demo")
    if args.users:
        cfg.demo.users = args.users
    result = run_demo(cfg, args.out, progress=not args.quiet)
    print()
    print(results_table(result.rows))
    print()
    print(f"report: {result.report}  (loss curve: {result.report.parent / 'pretrain' / 'loss.png'})")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="userbert-engine", description=__doc__.split("\n")[0]
                                + " UserBERT: pretraining user representations from behaviour logs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str, config: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        if config:
            sp.add_argument("--config", type=Path, help="run config TOML (model, masking, train, finetune)")
            sp.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[],
                            help="override config values, e.g. --set model.layers=2 train.lr=3e-4")
        return sp

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

    sp = add("pretrain", cmd_pretrain, "masked multi-label pretraining (single process; "
             "`deepspeed cli/pretrain.py` for multi-GPU)", config=True)
    sp.add_argument("--data", type=Path, required=True, help="tokenized directory")
    sp.add_argument("--out", type=Path, required=True, help="run directory")
    sp.add_argument("--steps", type=int, help="override train.steps")

    sp = add("finetune", cmd_finetune, "fine-tune on a downstream task (first token + task head)", config=True)
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

    sp = add("demo", cmd_demo, "the whole pipeline on synthetic data, on a CPU, in a few minutes", config=True)
    sp.add_argument("--out", type=Path, default=Path("demo-out"), help="where the report goes (default: demo-out)")
    sp.add_argument("--users", type=int, help="override demo.users")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from tokenizer.typed_config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
