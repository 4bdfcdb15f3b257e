"""Optimizer and learning-rate schedule, for both phases: which parameters get weight decay, AdamW,
and the schedule (linear warmup, then constant, linear or cosine decay to zero).  docs/TRAINING.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from engine.config import TrainConfig


def weight_decay_mask(model: nn.Module) -> dict[int, bool]:
    """id(parameter) -> whether it gets weight decay, by the parameter's role, not its name: the weights
    of Linear layers (dense projections: attention, feed-forward, the segments' input projections, heads)
    do; embedding tables, LayerNorms, biases and free vectors (the CLS token) do not (as in BERT)."""
    return {id(p): isinstance(module, nn.Linear) and name == "weight"
            for module in model.modules() for name, p in module.named_parameters(recurse=False)}


def build_optimizer(model: nn.Module, lr: float, betas, weight_decay: float, eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with two groups: weight decay on what :func:`weight_decay_mask` marks, none on the rest."""
    decays = weight_decay_mask(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decays[id(p)] else no_decay).append(p)
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
