"""Optimizer and learning-rate schedule, for both phases: which parameters get weight decay, AdamW,
and the schedule (linear warmup, then constant, linear or cosine decay to zero).  docs/TRAINING.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from engine.config import TrainConfig


def decays(name: str, p: nn.Parameter) -> bool:
    """Whether parameter ``name`` gets weight decay: not biases, LayerNorms and embedding tables (as in BERT)."""
    return not (p.ndim < 2 or "emb" in name or "norm" in name)


def build_optimizer(model: nn.Module, lr: float, betas, weight_decay: float, eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with two groups: weight decay on what :func:`decays`, none on the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.steps, tc.warmup_steps, tc.schedule))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r} (expected constant, linear or cosine)")
