"""Masked multi-label pretraining: the single-process loop.

Run directory layout::

    RUNDIR/config.json          the resolved run config
    RUNDIR/metrics.jsonl        one line per logged step (loss, per-head loss, lr, grad norm, users/s)
    RUNDIR/tensorboard/         the same scalars for TensorBoard
    RUNDIR/loss.png             loss curve, written at the end
    RUNDIR/model/               exported weights (safetensors) + model.json, for finetune and embed
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.checkpoint import save_model
from engine.collate import CollateConfig, Collator
from engine.config import RunConfig, VocabSpec
from engine.data import pretrain_batches, to_device
from engine.model import UserBERT, user_attr_offsets
from engine.schedule import lr_factor
from engine.telemetry import MetricsLogger, plot_loss_curve
from tokenizer.shards import open_tokenized

log = logging.getLogger("userbert")

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run aborts


@dataclass
class PretrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    seconds: float
    users_per_s: float
    losses: list[float] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {name!r} but CUDA is not available on this machine")
    return device


def build_optimizer(model: torch.nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, LayerNorm and embedding tables (as in BERT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def pretrain(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, *, progress: bool = True,
             users: np.ndarray | None = None) -> PretrainResult:
    """Pretrain on a tokenized directory and export the model to ``run_dir/model``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)

    data = open_tokenized(data_dir)
    spec = VocabSpec.from_manifest(data.manifest)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    cfg.log(log)

    model = UserBERT(cfg.model, spec).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters on %s; %d users", n_params / 1e6, device, data.num_users)
    optimizer = build_optimizer(model, tc.lr, tc.betas, tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.steps, tc.warmup_steps, tc.schedule))
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(cfg.masking.select_prob, cfg.masking.zero_prob))
    metrics = MetricsLogger(run_dir)

    losses: list[float] = []
    bad_steps = 0
    start = time.perf_counter()
    users_seen = 0
    bar = tqdm(total=tc.steps, desc="pretrain", disable=not progress, dynamic_ncols=True)
    step = 0
    try:
        model.train()
        for step, batch in pretrain_batches(collator, tc.batch_size, tc.seed, users=users,
                                                group_by_length=tc.group_by_length):
            if step >= tc.steps or (tc.max_seconds and time.perf_counter() - start > tc.max_seconds):
                break
            batch = to_device(batch, device)
            loss, stats = model.pretrain_loss(batch, cfg.masking)
            if not torch.isfinite(loss):
                bad_steps += 1
                log.warning("step %d: non-finite loss %s; skipping the update", step, loss.item())
                if bad_steps >= MAX_BAD_STEPS:
                    raise FloatingPointError(f"{bad_steps} consecutive non-finite losses (last at step {step}); "
                                             "lower train.lr or check the data")
                optimizer.zero_grad(set_to_none=True)
                continue
            bad_steps = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            optimizer.step()
            scheduler.step()

            users_seen += batch.batch_size
            losses.append(loss.item())
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps - 1:
                elapsed = time.perf_counter() - start
                # The mean since the last record: single-step losses of length-grouped batches are noisy.
                window = losses[-(tc.log_every if step else 1):]
                record = {"loss": sum(window) / len(window), "step_loss": losses[-1], "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "users_per_s": users_seen / elapsed, **stats}
                metrics.log(step, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", users_s=f"{record['users_per_s']:.0f}")
    finally:
        bar.close()
        metrics.close()
    seconds = time.perf_counter() - start
    model_dir = save_model(run_dir / "model", model, cfg.model, spec, cfg.masking,
                           meta={"steps": len(losses), "data": str(data_dir)})
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    log.info("pretrained %d steps in %.1f s (%.0f users/s); model in %s",
             len(losses), seconds, users_seen / max(seconds, 1e-9), model_dir)
    return PretrainResult(run_dir, model_dir, len(losses), seconds, users_seen / max(seconds, 1e-9), losses)
