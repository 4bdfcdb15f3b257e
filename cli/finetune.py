"""Fine-tuning entry point for launchers.

    python cli/finetune.py ...                                                   # = userbert-engine finetune
    python cli/finetune.py ... --deepspeed_config DS.json                         # DeepSpeed, one process
    deepspeed [--num_gpus N] cli/finetune.py ... --deepspeed_config DS.json
    torchrun --nproc_per_node N cli/finetune.py ... --deepspeed_config DS.json

Parse, train, print — the same code path as `userbert-engine finetune` (cli/cmd_downstream.py), which
takes the same flags; the logic lives in engine/downstream/finetune.py.  With ``--deepspeed_config``
the process group comes from engine/train/distributed.py (the launcher's, or a one-member group for
a plain process: no MPI), every rank trains on its slice of each global batch, and rank 0 writes
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fine-tune a UserBERT model on a downstream task (DeepSpeed-capable)")
    add_finetune_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment.
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from common.typed_config import ConfigError

    try:
        out = run_finetune(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:  # setup errors (LabelError included): one line
        logging.getLogger("userbert").error("%s", e)
        return 2
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
