"""Fine-tuning entry point for launchers.

    python cli/finetune.py ...                                                   # = userbert-engine finetune
    python cli/finetune.py ... --deepspeed_config DS.json                         # DeepSpeed, one process
    deepspeed [--num_gpus N] cli/finetune.py ... --deepspeed_config DS.json
    torchrun --nproc_per_node N cli/finetune.py ... --deepspeed_config DS.json

Parse, build, train, close — the logic lives in engine/finetune.py.  Without DeepSpeed this is the
same code path as `userbert-engine finetune`.  With ``--deepspeed_config`` the process group comes
from engine/distributed.py (the launcher's, or a one-member group for a plain process: no MPI), the
task model and its parameter groups are handed to ``deepspeed.initialize``, every rank trains on
its slice of each global batch, and rank 0 writes the output directory.
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


def deepspeed_wrap(deepspeed, ds_config: dict):
    """A ``wrap`` for :func:`engine.finetune.finetune` that builds a DeepSpeed engine over the task model."""
    import torch

    def wrap(model, groups):
        # Our AdamW with its per-group learning rates (head, layer-wise decay); DeepSpeed's own optimizer
        # section would flatten them to one rate (finetune_deepspeed_config checked and removed it).
        # dist_init_required=False: the process group is ours (engine/distributed.py).
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=ds_config,
                                          dist_init_required=False)
        return DeepSpeedStepper(engine)

    return wrap


def run_deepspeed(args: argparse.Namespace) -> dict | None:
    """Fine-tune through DeepSpeed; the result on rank 0 (None elsewhere)."""
    from cli.common import load_run_config
    from engine.deepspeed_config import load_ds_json
    from engine.distributed import init_distributed, shutdown
    from engine.finetune import finetune_deepspeed_config
    from engine.trainer import import_deepspeed

    cfg = load_run_config(args)
    ctx = init_distributed(cfg.train.device)
    try:
        deepspeed = import_deepspeed(ctx.device.type)
        if ctx.device.type == "cuda":
            args.set = [*args.set, f'train.device="{ctx.device}"']
        ds = finetune_deepspeed_config(load_ds_json(args.deepspeed_config), cfg.finetune, ctx.world_size,
                                       ctx.device.type, str(args.deepspeed_config))
        out = run_finetune(args, rank=ctx.rank, world_size=ctx.world_size, wrap=deepspeed_wrap(deepspeed, ds))
        return out if ctx.is_main else None
    finally:
        shutdown(ctx)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fine-tune a UserBERT model on a downstream task (DeepSpeed-capable)")
    add_finetune_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--deepspeed_config", type=Path, help="DeepSpeed JSON config (fine-tune through a DeepSpeed engine; "
                                                         "e.g. configs/ds/zero1_bf16.json)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from common.typed_config import ConfigError
    from engine.distributed import launched_world_size

    world = launched_world_size()
    if world > 1 and args.deepspeed_config is None:
        p.error(f"WORLD_SIZE={world}: multi-process fine-tuning runs through DeepSpeed; pass --deepspeed_config")
    try:
        out = run_deepspeed(args) if args.deepspeed_config else run_finetune(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # setup errors (LabelError included): one line
        logging.getLogger("userbert").error("%s", e)
        return 2
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
