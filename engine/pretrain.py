"""Masked multi-label pretraining: one entry point for a single process, torchrun and the deepspeed launcher.

``pretrain(cfg, data_dir, run_dir)`` checks everything it can before any work, joins (or creates)
the process group, trains (engine/trainer.py), exports the model and destroys the group.

Run directory layout::

    RUNDIR/config.json          the resolved run config (DeepSpeed's choices applied)
    RUNDIR/ds_config.json       the resolved DeepSpeed config (DeepSpeed runs only)
    RUNDIR/metrics.jsonl        one line per logged step: loss (total and per head), lr, grad norm, loss scale,
                                users/s, tokens/s, data wait, memory
    RUNDIR/tensorboard/         the same scalars for TensorBoard
    RUNDIR/loss.png             loss curve, written at the end
    RUNDIR/checkpoints/         resume checkpoints (engine/checkpointing.py), the last K kept
    RUNDIR/model/               exported weights (safetensors, fp32) + model.json, for finetune and embed
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import atomic_write
from engine.config import RunConfig, VocabSpec
from engine.data import batch_layout
from engine.distributed import init_distributed, launched_world_size, shutdown
from engine.distributed import resolve_device as _resolve_device
from engine.trainer import (  # noqa: F401  (build_optimizer and the errors are part of this module's API)
    BadStepsError,
    Trainer,
    TrainingSetupError,
    build_optimizer,
    import_deepspeed,
    resume_target,
)
from tokenizer.shards import open_tokenized

log = logging.getLogger("userbert")


class TrainingInterrupted(BaseException):
    """SIGTERM/SIGINT stopped the run after a checkpoint.  A BaseException, like KeyboardInterrupt: code that
    catches ``Exception`` must not carry on as if pretraining had finished (there is no exported model)."""

    def __init__(self, result: PretrainResult):
        super().__init__(f"pretraining stopped by {result.stopped} at step {result.end_step}; "
                         f"checkpoint {result.checkpoint} (continue with --resume)")
        self.result = result


@dataclass
class PretrainResult:
    run_dir: Path
    model_dir: Path | None  # None when a signal stopped the run (TrainingInterrupted; a checkpoint instead)
    steps: int  # optimizer steps run by this call
    seconds: float
    users_per_s: float
    losses: list[float] = field(default_factory=list)  # global loss of each step run by this call
    start_step: int = 0  # > 0 for a resumed run
    end_step: int = 0
    stopped: str | None = None  # "SIGTERM" / "SIGINT" (then raised inside TrainingInterrupted)
    checkpoint: Path | None = None  # the last checkpoint written
    skipped_steps: int = 0
    backend: str = "torch"


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda if available, else cpu (fine-tuning and embedding use this too)."""
    return _resolve_device(name)


def pretrain(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, *, progress: bool = True,
             users: np.ndarray | None = None, deepspeed_config: str | Path | dict | None = None,
             resume: bool | str | Path = False, overwrite: bool = False) -> PretrainResult:
    """Pretrain on a tokenized directory and export the model to ``run_dir/model``.

    deepspeed_config: a DeepSpeed JSON (path or dict): train on DeepSpeed, else on plain torch.
    resume: True picks the latest complete checkpoint in ``run_dir/checkpoints`` (a fresh start if there is
    none); a path names one.  overwrite: start afresh even if ``run_dir`` holds an earlier run's checkpoints.
    Under a launcher every rank calls this; rank 0 writes the files.

    Raises :class:`TrainingInterrupted` (carrying the result) when SIGTERM/SIGINT stopped the run after a
    checkpoint, :class:`BadStepsError` after too many non-finite steps, ValueError subclasses for setups that
    cannot run (before any work).
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    # ---- everything that can fail, before any work: config, world size, device, data
    world = launched_world_size()
    device = _resolve_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolved = None
    if deepspeed_config is not None:
        from engine.deepspeed_config import load_ds_json, resolve_ds_config

        where = str(deepspeed_config) if not isinstance(deepspeed_config, dict) else "deepspeed config"
        raw = deepspeed_config if isinstance(deepspeed_config, dict) else load_ds_json(deepspeed_config)
        resolved = resolve_ds_config(raw, tc, world, device.type, where)
        cfg = replace(cfg, train=resolved.train)
        layout = resolved.layout
        import_deepspeed(device.type)  # a missing DeepSpeed is a setup error too
    else:
        layout = batch_layout(tc.batch_size, world, tc.micro_batch_size)
        if tc.precision == "bf16" and device.type == "cpu":
            log.info("train.precision = bf16 on CPU: autocast to bfloat16 (slower than fp32 on most CPUs)")
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{data_dir}: no tokenized data here (manifest.json missing); run "
                                "`userbert-engine tokenize` first")
    data = open_tokenized(data_dir)
    spec = VocabSpec.from_manifest(data.manifest)
    rows = None if users is None else np.asarray(users, dtype=np.int64)
    n_rows = data.num_users if rows is None else len(rows)
    if n_rows < layout.global_batch:
        raise ValueError(f"{data_dir}: {n_rows} users cannot fill one global batch of {layout.global_batch}")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)

    ctx = init_distributed(tc.device)
    trainer = None
    try:
        resume_from = resume_target(run_dir, resume, overwrite, ctx)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(run_dir / "config.json", lambda p: Path(p).write_text(json.dumps(cfg.to_dict(), indent=2)))
            if resolved is not None:
                atomic_write(run_dir / "ds_config.json",
                             lambda p: Path(p).write_text(json.dumps(resolved.config, indent=2)))
                log.info("deepspeed config: %s", json.dumps(resolved.config, sort_keys=True))
            cfg.log(log)
        trainer = Trainer(cfg, data, spec, run_dir, ctx, layout, resolved_ds=resolved, resume=resume_from, rows=rows,
                          progress=progress, data_dir=str(data_dir))
        out = trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        shutdown(ctx)
    ups = out.users / max(out.seconds, 1e-9)
    if ctx.is_main:
        how = f"stopped by {out.stopped}" if out.stopped else "done"
        log.info("pretrained steps %d..%d in %.1f s (%.0f users/s), %s; model in %s, checkpoint %s", out.start_step,
                 out.end_step, out.seconds, ups, how, out.model_dir, out.checkpoint)
    result = PretrainResult(run_dir, out.model_dir, out.end_step - out.start_step, out.seconds, ups, out.losses,
                            out.start_step, out.end_step, out.stopped, out.checkpoint, out.skipped_steps,
                            "deepspeed" if resolved is not None else "torch")
    if out.stopped:
        raise TrainingInterrupted(result)
    return result
