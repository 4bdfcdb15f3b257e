"""DeepSpeed JSON configs: read, fill "auto" from the run config, check, and hand to DeepSpeed.

A DeepSpeed config is data: JSON, parsed with :mod:`json`, never executed.  The run config
(TOML, :class:`engine.config.TrainConfig`) is the single source of the training recipe; the JSON
adds the systems side (precision, ZeRO stage, communication).  The rules, as in Hugging Face's
DeepSpeed integration:

- ``"auto"`` (or a missing key) takes the run config's value: ``train_batch_size`` <- batch_size,
  ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` <- derived from the world
  size (engine.data.loader.batch_layout), ``gradient_clipping`` <- grad_clip, optimizer lr / betas / eps /
  weight_decay, scheduler warmup / total steps / peak lr.
- An explicit number must agree with the run config; a mismatch is an error that names both.
- A ``scheduler`` section chooses the decay shape (WarmupLR: constant, WarmupDecayLR: linear,
  WarmupCosineLR: cosine); ``train.schedule`` is set from it.

The ``optimizer`` and ``scheduler`` sections are translated, not passed on: the trainer builds
torch's AdamW (no weight decay on biases, norms and embeddings) and a LambdaLR over
:func:`engine.train.optim.lr_factor`, and gives both to ``deepspeed.initialize``.  So DeepSpeed and
the plain-torch backend run the same optimiser and the same schedule, and no op is compiled
(DeepSpeed's FusedAdam would JIT-build on first use).  Keys starting with ``_`` are comments.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.atomic import read_json
from common.typed_config import ConfigError
from engine.config import TrainConfig
from engine.data.loader import BatchLayout, batch_layout

AUTO = "auto"
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
OPTIMIZERS = ("adam", "adamw")


@dataclass
class ResolvedDeepSpeed:
    config: dict[str, Any]  # what deepspeed.initialize gets (optimizer/scheduler sections removed)
    train: TrainConfig  # the run's TrainConfig with the JSON's choices applied
    layout: BatchLayout
    precision: str  # "bf16" | "fp16" | "fp32"
    zero_stage: int
    min_loss_scale: float  # fp16: a skipped step at this scale can no longer recover


def load_ds_json(path: str | Path) -> dict[str, Any]:
    return read_json(path, ConfigError(f"{path}: DeepSpeed config not found"), ConfigError)


def _strip_comments(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_comments(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, list):
        return [_strip_comments(v) for v in d]
    return d


def _is_auto(v: Any) -> bool:
    return v is None or v == AUTO


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def resolve_ds_config(raw: dict[str, Any], train: TrainConfig, world_size: int, device_type: str,
                      where: str = "deepspeed config") -> ResolvedDeepSpeed:
    """Fill "auto" values, check explicit ones against ``train``, derive the batch layout.

    Raises ConfigError (a ValueError) for anything DeepSpeed would fail on later or that would silently
    train something other than the run config says.
    """
    ds = _strip_comments(copy.deepcopy(raw))
    tc = replace(train)
    mismatches: list[str] = []

    def check(key: str, value: Any, expected: Any, run_key: str) -> Any:
        if _is_auto(value):
            return expected
        if not _same(value, expected):
            mismatches.append(f"{key} = {value!r} but {run_key} = {expected!r}")
        return value

    # Precision.
    if "amp" in ds and _enabled(ds["amp"]):
        raise ConfigError(f"{where}: amp: NVIDIA apex AMP is not supported; use \"bf16\" or \"fp16\"")
    fp16, bf16 = _enabled(ds.get("fp16")), _enabled(ds.get("bf16") or ds.get("bfloat16"))
    if fp16 and bf16:
        raise ConfigError(f"{where}: fp16 and bf16 are both enabled; pick one")
    if fp16 and device_type != "cuda":
        raise ConfigError(f"{where}: fp16 needs a GPU (DeepSpeed refuses fp16 on {device_type}); use a bf16 config "
                          "such as configs/ds/zero2_bf16.json, or fp32")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    min_loss_scale = float(ds.get("fp16", {}).get("min_loss_scale", 1.0)) if fp16 else 0.0

    zero = ds.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization: expected an object")
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2):
        raise ConfigError(f"{where}: zero_optimization.stage = {stage}: this trainer supports ZeRO stages 0, 1 and 2 "
                          "(the model has tens of millions of parameters; stage 2 already shards gradients and "
                          "optimizer states)")

    # Batch: the global batch is the run config's; micro-batch and accumulation may come from either.
    b = check("train_batch_size", ds.get("train_batch_size"), tc.batch_size, "train.batch_size")
    m_json, a_json = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    if not _is_auto(m_json) and tc.micro_batch_size and m_json != tc.micro_batch_size:
        mismatches.append(f"train_micro_batch_size_per_gpu = {m_json} but train.micro_batch_size = "
                          f"{tc.micro_batch_size}")
    micro = tc.micro_batch_size or (0 if _is_auto(m_json) else int(m_json))
    accum = 0 if _is_auto(a_json) else int(a_json)

    clip = check("gradient_clipping", ds.get("gradient_clipping"), tc.grad_clip, "train.grad_clip")

    opt = ds.pop("optimizer", None)
    if opt is not None:
        otype = str(opt.get("type", "")).lower()
        if otype not in OPTIMIZERS:
            raise ConfigError(f"{where}: optimizer.type = {opt.get('type')!r}: supported are Adam and AdamW (the "
                              "paper's optimiser; both run as torch.optim.AdamW)")
        params = opt.get("params", {}) or {}
        unknown = set(params) - {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}
        if unknown:
            raise ConfigError(f"{where}: optimizer.params.{sorted(unknown)[0]}: not supported (known: lr, betas, "
                              "eps, weight_decay)")
        if params.get("adam_w_mode") is False and not _is_auto(params.get("weight_decay")) and params["weight_decay"]:
            raise ConfigError(f"{where}: optimizer.params.adam_w_mode = false (L2 weight decay) is not supported; "
                              "the trainer uses decoupled weight decay (AdamW)")
        check("optimizer.params.lr", params.get("lr"), tc.lr, "train.lr")
        check("optimizer.params.betas", params.get("betas"), list(tc.betas), "train.betas")
        check("optimizer.params.eps", params.get("eps"), tc.eps, "train.eps")
        check("optimizer.params.weight_decay", params.get("weight_decay"), tc.weight_decay, "train.weight_decay")

    sched = ds.pop("scheduler", None)
    if sched is not None:
        stype = sched.get("type")
        if stype not in SCHEDULERS:
            raise ConfigError(f"{where}: scheduler.type = {stype!r}: supported are {', '.join(SCHEDULERS)} "
                              "(warmup, then constant, linear or cosine decay)")
        params = sched.get("params", {}) or {}
        tc.schedule = SCHEDULERS[stype]
        if params.get("warmup_type", None) != "linear":
            raise ConfigError(f"{where}: scheduler.params.warmup_type: set it to \"linear\", the warmup this trainer "
                              "implements (DeepSpeed's default is \"log\")")
        for key in ("warmup_min_lr", "warmup_min_ratio", "cos_min_ratio"):
            if not _is_auto(params.get(key)) and params[key] != 0:
                raise ConfigError(f"{where}: scheduler.params.{key} = {params[key]}: only 0 is supported "
                                  "(the schedule warms up from 0 and decays to 0)")
        check("scheduler.params.warmup_num_steps", params.get("warmup_num_steps"), tc.warmup_steps,
              "train.warmup_steps")
        if stype != "WarmupLR":
            check("scheduler.params.total_num_steps", params.get("total_num_steps"), tc.steps, "train.steps")
        if stype in ("WarmupLR", "WarmupDecayLR"):
            check("scheduler.params.warmup_max_lr", params.get("warmup_max_lr"), tc.lr, "train.lr")

    if mismatches:
        raise ConfigError(f"{where}: values disagree with the run config: " + "; ".join(mismatches)
                          + ". Write \"auto\" in the JSON to take the run config's values, or make them equal")

    layout = batch_layout(int(b), world_size, micro, accum, where="train")
    tc.micro_batch_size = layout.micro_batch
    ds["train_batch_size"] = layout.global_batch
    ds["train_micro_batch_size_per_gpu"] = layout.micro_batch
    ds["gradient_accumulation_steps"] = layout.accumulation
    ds["gradient_clipping"] = float(clip)
    # DeepSpeed's own periodic console report would interleave with our progress bar.
    ds.setdefault("steps_per_print", 2**62)
    return ResolvedDeepSpeed(ds, tc, layout, precision, stage, min_loss_scale)
