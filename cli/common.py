"""Helpers shared by the subcommand modules: logging, `--set` overrides, config loading."""

from __future__ import annotations

import argparse
import logging
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("userbert")


def setup_logging(verbose: bool) -> None:
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


def add_config_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", type=Path, help="run config TOML (model, masking, train, finetune)")
    sp.add_argument("--set", nargs="*", metavar="KEY=VALUE", default=[],
                    help="override config values, e.g. --set model.layers=2 train.lr=3e-4")


def load_run_config(args: argparse.Namespace, default: str | None = None):
    from engine.config import load_config

    path = args.config or (default_config_path(default) if default else None)
    return load_config(path, parse_overrides(args.set))
