"""The backends behind the training loop's :class:`~engine.train.loop.Backend` protocol.

- :class:`TorchBackend`: a torch optimizer (and schedule), DDP when there are several ranks,
  optional bf16 autocast.  Needs nothing beyond torch (the borrowed GPUs have no DeepSpeed).
- :class:`DeepSpeedBackend`: ``deepspeed.initialize`` with the same optimizer and schedule, and
  the precision / ZeRO stage / accumulation of a JSON config.  DeepSpeed is imported only here.

Both take a *step module* (``forward(*inputs) -> (loss, stats)``: what DDP and DeepSpeed wrap,
their hooks run on forward) and an optimizer built by the phase (engine/train/optim.py), and both
serve pretraining and fine-tuning.  Saving and loading resume checkpoints is theirs too
(docs/TRAINING.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.model.export import save_safetensors
from engine.train.checkpoints import load_optimizer, load_scheduler, save_optimizer, save_scheduler
from engine.train.distributed import DistContext, all_reduce_sum
from engine.train.loop import StepOutcome, TrainingSetupError

log = logging.getLogger("userbert")


class TorchBackend:
    name = "torch"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, accumulation: int = 1,
                 precision: str = "fp32", grad_clip: float = 0.0, clip_params: Iterable[nn.Parameter] | None = None,
                 weights: nn.Module | None = None):
        """``clip_params``: whose gradient norm is clipped (default: the module's parameters, in their order);
        ``weights``: the module whose state_dict a checkpoint holds (default: the step module)."""
        self.module, self.optimizer, self.ctx, self.scheduler = module, optimizer, ctx, scheduler
        self.accumulation, self.precision, self.grad_clip = accumulation, precision, grad_clip
        self.weights = weights if weights is not None else module
        self.clip_params = list(clip_params) if clip_params is not None else list(module.parameters())
        self.ddp = None
        if ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None, broadcast_buffers=False)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def micro_step(self, inputs: tuple, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        net = self.ddp or self.module
        last = micro == self.accumulation - 1
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with self._autocast():
                loss, stats = net(*inputs)
            (loss / self.accumulation).backward()
        return loss.detach(), stats

    def optimizer_step(self, skip: bool) -> StepOutcome:
        if skip:  # a non-finite loss somewhere: its gradients are garbage, drop them and keep the weights
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(False)
        norm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip or math.inf)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(True, norm)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.ctx)

    def save(self, root: Path, tag: str) -> None:
        if not self.ctx.is_main:  # every rank holds the same replica
            return
        d = root / tag
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.weights.state_dict().items()}
        save_safetensors(d / "model.safetensors", state)
        save_optimizer(d, self.optimizer)
        if self.scheduler is not None:
            save_scheduler(d, self.scheduler)

    def load(self, root: Path, tag: str) -> None:
        from safetensors.torch import load_file

        d = root / tag
        self.weights.load_state_dict(load_file(str(d / "model.safetensors"), device=str(self.ctx.device)))
        load_optimizer(d, self.optimizer)
        if self.scheduler is not None:
            load_scheduler(d, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.weights.state_dict().items()}

    def close(self) -> None:
        pass


def _skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU (~30 s into ~/.cache/torch_extensions
    on a machine's first start).  Its only user is ``inference_all_reduce`` (tensor-parallel inference);
    training collectives go through torch.distributed (gloo) either way."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: the package has an attribute `torch` (the torch module).
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def import_deepspeed(device_type: str):
    """Import DeepSpeed for training on ``device_type``, or say clearly why it cannot be used."""
    if device_type == "cpu" and "deepspeed" not in sys.modules:
        # Skips DeepSpeed's accelerator probing (and its "Setting accelerator to CPU" warning).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed 0.19 calls the deprecated all_gather_into_tensor on every ZeRO step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    try:
        import deepspeed
    except ImportError as e:
        raise TrainingSetupError(f"--deepspeed_config needs DeepSpeed, which does not import here ({e}); install it "
                                 "(pip install deepspeed) or train without a DeepSpeed config (the plain-torch "
                                 "backend, also under torchrun)") from None
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device_type == "cpu":
        _skip_cpu_shm_comm_build()
    return deepspeed


class DeepSpeedBackend:
    name = "deepspeed"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext, config: dict[str, Any],
                 *, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, precision: str = "fp32",
                 min_loss_scale: float = 1.0, weights: nn.Module | None = None):
        """``config``: a resolved DeepSpeed JSON (engine/train/deepspeed_config.py); ``weights``: the module
        whose full fp32 weights :meth:`full_state_dict` gathers (default: the step module)."""
        deepspeed = import_deepspeed(ctx.device.type)
        self.ctx, self.precision, self.min_loss_scale = ctx, precision, min_loss_scale
        self.weights = weights if weights is not None else module
        # dist_init_required=False: we own the process group (engine/train/distributed.py); DeepSpeed must not
        # look for MPI or re-read the environment.
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config, dist_init_required=False)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def micro_step(self, inputs: tuple, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self.engine(*inputs)
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step only at the accumulation boundary
        return loss.detach(), stats

    def _loss_scale(self) -> float | None:
        if self.precision != "fp16":
            return None
        opt = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, int | float | torch.Tensor):
                return float(v)
        return None

    def optimizer_step(self, skip: bool) -> StepOutcome:
        # DeepSpeed already stepped (or skipped) in micro_step's boundary call; read what it did.  It skips
        # updates with non-finite gradients in bf16 and fp16, not in fp32 (the loop raises then).
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        scale = self._loss_scale()
        recoverable = scale is not None and scale > self.min_loss_scale
        return StepOutcome(applied, norm, scale, recoverable)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.ctx)

    def save(self, root: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=True)

    def load(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise TrainingSetupError(f"{root / tag}: DeepSpeed could not load this checkpoint")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 weights, gathered from ZeRO partitions / bf16 master copies.  Collective: every rank calls."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        params = dict(self.weights.named_parameters())
        for name, t in self.weights.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(params[name]) if name in params else None
            t = full if full is not None else t.detach()
            out[name] = t.float().cpu() if t.is_floating_point() else t.cpu()
        return out

    def close(self) -> None:
        self.engine.destroy() if hasattr(self.engine, "destroy") else None
