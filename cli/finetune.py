"""Fine-tuning entry point: `python cli/finetune.py ...` or `deepspeed cli/finetune.py ... --deepspeed_config DS.json`.

Parse, build, train, close — the logic lives in engine/finetune.py.  Without DeepSpeed this is the
same code path as `userbert-engine finetune`.  With ``--deepspeed_config`` (or under the
`deepspeed` launcher) the task model and its parameter groups are handed to
``deepspeed.initialize``, every rank trains on its slice of each global batch, and rank 0 writes
the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cli.cmd_downstream import add_finetune_args, run_finetune  # noqa: E402


class DeepSpeedStepper:
    """engine.backward + engine.step: the :class:`engine.finetune.Stepper` interface over a DeepSpeed engine."""

    def __init__(self, engine):
        self.module = engine
        self.engine = engine

    def step(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()


def deepspeed_wrap(ds_config: dict, grad_clip: float):
    """A ``wrap`` for :func:`engine.finetune.finetune` that builds a DeepSpeed engine over the task model."""
    import deepspeed
    import torch

    def wrap(model, groups):
        config = dict(ds_config)
        config.setdefault("gradient_clipping", grad_clip)
        # Our AdamW with its per-group learning rates (head, layer-wise decay); DeepSpeed's own
        # optimizer section would flatten them to one rate.
        optimizer = None if "optimizer" in config else torch.optim.AdamW(groups)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=config)
        return DeepSpeedStepper(engine)

    return wrap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_finetune_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON config (fine-tune through a DeepSpeed engine)")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    wrap = None
    if world > 1 or args.deepspeed_config:
        if args.deepspeed_config is None:
            p.error(f"WORLD_SIZE={world}: multi-process fine-tuning runs through DeepSpeed; pass --deepspeed_config")
        import deepspeed
        import torch

        from cli.common import load_run_config

        deepspeed.init_distributed()
        cfg = load_run_config(args)
        if torch.cuda.is_available():
            torch.cuda.set_device(args.local_rank)
            args.set = [*args.set, f'train.device="cuda:{args.local_rank}"']
        ds_config = json.loads(args.deepspeed_config.read_text())
        # DeepSpeed checks its batch arithmetic: our batch_size is per rank (micro batch), no accumulation.
        ds_config.setdefault("train_micro_batch_size_per_gpu", cfg.finetune.batch_size)
        ds_config.setdefault("gradient_accumulation_steps", 1)
        wrap = deepspeed_wrap(ds_config, cfg.finetune.grad_clip)
    out = run_finetune(args, rank=rank, world_size=world, wrap=wrap)
    if rank == 0:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
