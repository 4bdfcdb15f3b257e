"""The pretraining loop, for one process or many, on plain torch or on DeepSpeed.

    pretrain() ── checks everything ── init_distributed() ── Trainer(...).run() ── shutdown()

One loop drives two backends with the same small interface (``micro_step``, ``optimizer_step``,
``save``/``load``, ``full_state_dict``):

- :class:`TorchBackend`: AdamW + LambdaLR, DDP when there are several ranks, optional bf16
  autocast.  Needs nothing beyond torch (the borrowed GPUs have no DeepSpeed).
- :class:`DeepSpeedBackend`: ``deepspeed.initialize`` with the same optimizer and schedule, and the
  precision / ZeRO stage / accumulation of a JSON config.  DeepSpeed is imported only here.

Each optimizer step runs ``accumulation`` micro-batches, then one all-reduce of a small vector
(loss, per-head losses, users, tokens, data wait, stop flags) gives every rank the same global
numbers, so decisions that need agreement (skip, abort, stop on a signal) are taken identically
on all ranks without a second collective.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from engine.checkpoint import save_model
from engine.checkpointing import (
    checkpoint_root,
    complete_checkpoints,
    latest_checkpoint,
    load_optimizer,
    load_rng,
    load_scheduler,
    prune,
    read_state,
    save_optimizer,
    save_rng,
    save_scheduler,
    tag_for,
    write_state,
)
from engine.collate import CollateConfig, Collator
from engine.config import MaskingConfig, RunConfig, TrainConfig, VocabSpec
from engine.data import BatchLayout, TrainBatches, TrainLoader, auto_workers
from engine.distributed import DistContext, all_reduce_sum, barrier, broadcast_object
from engine.model import UserBERT, user_attr_offsets
from engine.schedule import lr_factor
from engine.telemetry import MetricsLogger, Progress, memory_stats, plot_loss_curve

log = logging.getLogger("userbert")


class TrainingSetupError(ValueError):
    """The run cannot start as asked (existing checkpoints, an incompatible resume, ...)."""


class BadStepsError(FloatingPointError):
    """Too many consecutive non-finite losses or unrecoverable skipped updates."""


def build_optimizer(model: nn.Module, lr: float, betas, weight_decay: float, eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, LayerNorm and embedding tables (as in BERT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in name or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.steps, tc.warmup_steps, tc.schedule))


class PretrainStep(nn.Module):
    """What DDP and DeepSpeed wrap: ``forward(batch) -> (loss, stats)`` (their hooks run on forward)."""

    def __init__(self, model: UserBERT, masking: MaskingConfig):
        super().__init__()
        self.model = model
        self.masking = masking

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.pretrain_loss(batch, self.masking)


@dataclass
class StepOutcome:
    applied: bool  # the optimizer updated the weights
    grad_norm: float | torch.Tensor | None = None  # before clipping
    loss_scale: float | None = None  # fp16 only
    recoverable: bool = False  # a skipped step that the loss scaler handles (fp16 overflow above the minimum scale)


# --------------------------------------------------------------------------------------------- backends


class TorchBackend:
    name = "torch"

    def __init__(self, model: UserBERT, cfg: RunConfig, ctx: DistContext, layout: BatchLayout):
        tc = cfg.train
        self.model, self.ctx, self.layout, self.tc = model, ctx, layout, tc
        self.module = PretrainStep(model, cfg.masking)
        self.optimizer = build_optimizer(model, tc.lr, tc.betas, tc.weight_decay, tc.eps,
                                         fused=ctx.device.type in ("cuda", "cpu") or None)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.ddp = None
        if ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.module, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                               else None, broadcast_buffers=False)
        self.precision = tc.precision
        self.skips_nonfinite = True

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def micro_step(self, batch, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        net = self.ddp or self.module
        last = micro == self.layout.accumulation - 1
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with self._autocast():
                loss, stats = net(batch)
            (loss / self.layout.accumulation).backward()
        return loss.detach(), stats

    def optimizer_step(self, skip: bool) -> StepOutcome:
        if skip:  # a non-finite loss somewhere: its gradients are garbage, drop them and keep the weights
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(False)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(True, norm)

    def save(self, root: Path, tag: str) -> None:
        if not self.ctx.is_main:  # every rank holds the same replica
            return
        from safetensors.torch import save_file

        from engine.checkpoint import atomic_write

        d = root / tag
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        atomic_write(d / "model.safetensors", lambda p: save_file(state, p))
        save_optimizer(d, self.optimizer)
        save_scheduler(d, self.scheduler)

    def load(self, root: Path, tag: str) -> None:
        from safetensors.torch import load_file

        d = root / tag
        self.model.load_state_dict(load_file(str(d / "model.safetensors"), device=str(self.ctx.device)))
        load_optimizer(d, self.optimizer)
        load_scheduler(d, self.scheduler)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.model.state_dict().items()}

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

    def __init__(self, model: UserBERT, cfg: RunConfig, ctx: DistContext, resolved):
        deepspeed = import_deepspeed(ctx.device.type)
        tc = resolved.train
        self.model, self.ctx, self.resolved, self.tc = model, ctx, resolved, tc
        self.layout = resolved.layout
        module = PretrainStep(model, cfg.masking)
        optimizer = build_optimizer(model, tc.lr, tc.betas, tc.weight_decay, tc.eps,
                                    fused=True if ctx.device.type == "cuda" else None)
        scheduler = build_scheduler(optimizer, tc)
        # dist_init_required=False: we own the process group (engine/distributed.py); DeepSpeed must not
        # look for MPI or re-read the environment.
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=resolved.config, dist_init_required=False)
        # DeepSpeed skips updates with non-finite gradients in bf16 and fp16, not in fp32.
        self.skips_nonfinite = resolved.precision in ("bf16", "fp16")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def micro_step(self, batch, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self.engine(batch)
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step only at the accumulation boundary
        return loss.detach(), stats

    def _loss_scale(self) -> float | None:
        if self.resolved.precision != "fp16":
            return None
        opt = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, int | float | torch.Tensor):
                return float(v)
        return None

    def optimizer_step(self, skip: bool) -> StepOutcome:
        # DeepSpeed already stepped (or skipped) in micro_step's boundary call; read what it did.
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        scale = self._loss_scale()
        recoverable = scale is not None and scale > self.resolved.min_loss_scale
        return StepOutcome(applied, norm, scale, recoverable)

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
        params = dict(self.model.named_parameters())
        for name, t in self.model.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(params[name]) if name in params else None
            t = full if full is not None else t.detach()
            out[name] = t.float().cpu() if t.is_floating_point() else t.cpu()
        return out

    def close(self) -> None:
        self.engine.destroy() if hasattr(self.engine, "destroy") else None


# ------------------------------------------------------------------------------------------------ trainer


@dataclass
class TrainOutcome:
    start_step: int
    end_step: int
    seconds: float
    users: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    stopped: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    checkpoint: Path | None = None  # the last checkpoint written
    model_dir: Path | None = None


def data_fingerprint(manifest: dict[str, Any], rows: np.ndarray | None) -> str:
    h = hashlib.sha256(json.dumps(manifest.get("shards", manifest), sort_keys=True).encode())
    if rows is not None:
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class _Signals:
    """SIGTERM/SIGINT set a flag that the loop reads between steps (it then saves a checkpoint and
    stops); a second signal falls back to the previous handler.  Main thread only."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # impatient: behave as if we had not been here
            prev = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, prev)
            if callable(prev):
                prev(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s received: stopping after this step and writing a checkpoint (send it again to stop now)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


class Trainer:
    def __init__(self, cfg: RunConfig, data, spec: VocabSpec, run_dir: Path, ctx: DistContext, layout: BatchLayout,
                 *, resolved_ds=None, resume: Path | None = None, rows: np.ndarray | None = None,
                 progress: bool = True, data_dir: str = ""):
        self.cfg, self.data, self.spec, self.run_dir, self.ctx, self.layout = cfg, data, spec, run_dir, ctx, layout
        self.tc = cfg.train
        self.rows, self.progress, self.data_dir = rows, progress, data_dir
        self.root = checkpoint_root(run_dir)
        self.fingerprint = data_fingerprint(data.manifest, rows)

        backend_name = DeepSpeedBackend.name if resolved_ds is not None else TorchBackend.name
        state = self._check_resumable(resume, backend_name) if resume is not None else None  # before any work

        torch.manual_seed(self.tc.seed)  # identical initial weights on every rank
        self.model = UserBERT(cfg.model, spec).to(ctx.device)
        if ctx.is_main:
            log.info("model: %.2fM parameters on %s x %d; %d users; global batch %d = %d x %d accumulation x %d ranks",
                     self.model.num_parameters() / 1e6, ctx.device, ctx.world_size, data.num_users,
                     layout.global_batch, layout.micro_batch, layout.accumulation, ctx.world_size)
        if resolved_ds is not None:
            self.backend = DeepSpeedBackend(self.model, cfg, ctx, resolved_ds)
            self.precision = resolved_ds.precision
        else:
            self.backend = TorchBackend(self.model, cfg, ctx, layout)
            self.precision = self.tc.precision
        # Dropout differs between ranks; the stream is a function of (seed, rank) and restored on resume.
        torch.manual_seed(int(np.random.SeedSequence([self.tc.seed, ctx.rank, 1]).generate_state(1)[0]))

        self.start_step = 0
        self.pending: list[float] = []  # losses since the last metrics record (carried across a resume)
        self.skipped_steps = 0
        self.bad_steps = 0
        self.users_before = 0
        if state is not None:
            self._load(resume, state)
        self.users_seen = self.users_before

    # -------------------------------------------------------------------------------- checkpoints

    def _state(self, step: int) -> dict[str, Any]:
        return {"step": step, "backend": self.backend.name, "precision": self.precision,
                "world_size": self.ctx.world_size, "global_batch": self.layout.global_batch,
                "micro_batch": self.layout.micro_batch, "accumulation": self.layout.accumulation,
                "seed": self.tc.seed, "group_by_length": self.tc.group_by_length, "data": self.fingerprint,
                "steps": self.tc.steps, "pending_losses": self.pending, "skipped_steps": self.skipped_steps,
                "bad_steps": self.bad_steps, "users_seen": self.users_seen}

    def _check_resumable(self, ckpt: Path, backend: str) -> dict[str, Any]:
        state = read_state(ckpt)
        want = {"backend": backend, "world_size": self.ctx.world_size,
                "global_batch": self.layout.global_batch, "micro_batch": self.layout.micro_batch,
                "seed": self.tc.seed, "group_by_length": self.tc.group_by_length, "data": self.fingerprint}
        diff = [f"{k}: checkpoint {state.get(k)!r}, this run {v!r}" for k, v in want.items() if state.get(k) != v]
        if diff:
            raise TrainingSetupError(f"{ckpt}: cannot resume exactly with a different setup ({'; '.join(diff)}); "
                                     "resume with the original world size, batch, seed and data, or start a new run")
        return state

    def _load(self, ckpt: Path, state: dict[str, Any]) -> None:
        self.backend.load(ckpt.parent, ckpt.name)
        load_rng(ckpt, self.ctx.rank)
        self.start_step = int(state["step"])
        self.pending = list(state.get("pending_losses", []))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        self.users_before = int(state.get("users_seen", 0))
        if state.get("steps") != self.tc.steps and self.ctx.is_main:
            log.warning("train.steps changed from %s to %d since the checkpoint: the learning-rate schedule follows "
                        "the new value", state.get("steps"), self.tc.steps)
        if self.ctx.is_main:
            log.info("resumed from %s (step %d)", ckpt, self.start_step)

    def save(self, step: int) -> Path:
        """A checkpoint of the state after ``step`` optimizer steps.  Collective: every rank calls."""
        d = self.root / tag_for(step)
        if self.ctx.is_main:
            d.mkdir(parents=True, exist_ok=True)
            (d / "trainer_state.json").unlink(missing_ok=True)  # incomplete until rewritten below
        barrier(self.ctx)
        self.backend.save(self.root, d.name)
        save_rng(d, self.ctx.rank)
        barrier(self.ctx)
        if self.ctx.is_main:
            write_state(d, self._state(step))
            removed = prune(self.root, self.tc.keep_checkpoints)
            log.info("checkpoint %s%s", d, f" (removed {len(removed)} older)" if removed else "")
        barrier(self.ctx)
        return d

    # ------------------------------------------------------------------------------------- loop

    def run(self) -> TrainOutcome:
        tc, ctx, layout = self.tc, self.ctx, self.layout
        main = ctx.is_main
        collator = Collator(self.data, user_attr_offsets(self.spec),
                            CollateConfig(self.cfg.masking.select_prob, self.cfg.masking.zero_prob))
        dataset = TrainBatches(collator, layout, ctx.rank, tc.seed, self.start_step, tc.steps, self.rows,
                               tc.group_by_length)
        workers = auto_workers(tc.loader_workers, ctx.device, _local_world_size())
        pin = tc.pin_memory and ctx.device.type == "cuda"
        loader = TrainLoader(dataset, workers, pin, tc.prefetch_factor, device=ctx.device)
        metrics = MetricsLogger(self.run_dir, enabled=main, start_step=self.start_step)
        bar = Progress(tc.steps, self.start_step, enabled=main and self.progress)
        heads = [f"loss/{s.name}.{a}" for s in self.spec.segments for a in s.attributes]
        n_fixed = 7  # loss, signal stop, time stop, users, tokens, masked words, data wait
        if main:
            log.info("training steps %d..%d on %s (%s, %s), %d loader threads%s", self.start_step, tc.steps,
                     self.backend.name, self.precision, ctx.backend, workers, ", pinned" if pin else "")

        losses: list[float] = []
        users_seen = tokens_seen = 0
        window_wait = 0.0
        outcome = TrainOutcome(self.start_step, self.start_step, 0.0, 0)
        start = last_log = time.perf_counter()
        step = self.start_step
        self.model.train()
        # The handlers stay through the final checkpoint and export: a signal there is noted, not fatal.
        with _Signals() as signals:
            try:
                it = iter(loader)
                while step < tc.steps:
                    lr = self.backend.lr()
                    loss_acc = torch.zeros((), device=ctx.device)
                    head_acc = np.zeros(len(heads))
                    users = tokens = masked = 0
                    for micro in range(layout.accumulation):
                        batch = next(it)
                        users += batch.batch_size
                        tokens += int(batch.seq_lens.sum())
                        if ctx.device.type != "cpu":
                            batch = batch.to(ctx.device, non_blocking=pin)
                        loss, stats = self.backend.micro_step(batch, micro)
                        loss_acc += loss.float()
                        head_acc += [stats.get(h, 0.0) for h in heads]
                        masked += stats.get("masked_words", 0.0)
                    timed_out = bool(tc.max_seconds) and time.perf_counter() - start > tc.max_seconds
                    vec = torch.tensor([0.0, float(signals.received is not None), float(timed_out), users, tokens,
                                        masked, loader.take_wait(), *(head_acc / layout.accumulation)],
                                       dtype=torch.float64, device=ctx.device)
                    vec[0] = loss_acc.double() / layout.accumulation
                    g = all_reduce_sum(vec, ctx).tolist()
                    step_loss = g[0] / ctx.world_size
                    finite = math.isfinite(step_loss)
                    res = self.backend.optimizer_step(skip=not finite)
                    if not finite and res.applied:
                        raise BadStepsError(f"step {step}: non-finite loss {step_loss}, and DeepSpeed in fp32 does "
                                            "not skip such updates, so the weights are now corrupt. Resume from the "
                                            "last checkpoint with a bf16 config or a lower train.lr")
                    if not res.applied:
                        self.skipped_steps += 1
                    bad = not finite or (not res.applied and not res.recoverable)
                    self.bad_steps = self.bad_steps + 1 if bad else 0
                    if bad and main:
                        log.warning("step %d: %s; update skipped (%d consecutive)", step,
                                    f"non-finite loss {step_loss}" if not finite else "non-finite gradients",
                                    self.bad_steps)
                    if self.bad_steps >= tc.max_bad_steps:
                        raise BadStepsError(
                            f"{self.bad_steps} consecutive bad steps (non-finite loss or gradients; the last at step "
                            f"{step}, loss {step_loss}): the run stops. Lower train.lr, check the data, or resume "
                            f"from the last checkpoint in {self.root} with --resume")
                    users_seen += int(g[3])
                    tokens_seen += int(g[4])
                    window_wait += g[6] / ctx.world_size
                    losses.append(step_loss)
                    if finite:
                        self.pending.append(step_loss)
                    step += 1
                    self.users_seen = self.users_before + users_seen
                    bar.update(1)

                    if (step - 1) % tc.log_every == 0 or step == tc.steps:
                        now = time.perf_counter()
                        elapsed = max(now - start, 1e-9)
                        record = {
                            "loss": sum(self.pending) / len(self.pending) if self.pending else step_loss,
                            "step_loss": step_loss, "lr": lr,
                            "grad_norm": float(res.grad_norm) if res.grad_norm is not None else float("nan"),
                            "users_per_s": users_seen / elapsed, "tokens_per_s": tokens_seen / elapsed,
                            "data_wait_s": window_wait, "data_wait_frac": window_wait / max(now - last_log, 1e-9),
                            "skipped_steps": self.skipped_steps, "masked_words": g[5],
                            "epoch": (step - 1) // dataset.per_epoch,
                            **{h: g[n_fixed + i] / ctx.world_size for i, h in enumerate(heads)},
                            **memory_stats(ctx.device),
                        }
                        if res.loss_scale is not None:
                            record["loss_scale"] = res.loss_scale
                        metrics.log(step - 1, record)
                        bar.show(record)
                        self.pending, window_wait, last_log = [], 0.0, now

                    if g[1] > 0:  # a signal on any rank
                        outcome.stopped = signal.Signals(signals.received or signal.SIGTERM).name
                        break
                    if g[2] > 0:
                        if main:
                            log.info("train.max_seconds = %s reached at step %d", tc.max_seconds, step)
                        break
                    if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                        outcome.checkpoint = self.save(step)
            finally:
                loader.close()
                bar.close()
                metrics.close()
            outcome = self._finish(outcome, step, start, users_seen, losses)
        return outcome

    def _finish(self, outcome: TrainOutcome, step: int, start: float, users_seen: int,
                losses: list[float]) -> TrainOutcome:
        tc, main = self.tc, self.ctx.is_main
        outcome.end_step = step
        outcome.seconds = time.perf_counter() - start
        outcome.users = users_seen
        outcome.losses = losses
        outcome.skipped_steps = self.skipped_steps
        if outcome.stopped or tc.checkpoint_at_end:
            if outcome.checkpoint is None or outcome.checkpoint.name != tag_for(step):
                outcome.checkpoint = self.save(step)
        if not outcome.stopped:
            outcome.model_dir = self.export(step)
        if main:
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return outcome

    def export(self, step: int) -> Path:
        """fp32 weights as safetensors + model.json in RUNDIR/model (for finetune and embed)."""
        state = self.backend.full_state_dict()  # collective
        out = self.run_dir / "model"
        if self.ctx.is_main:
            cpu_model = UserBERT(self.cfg.model, self.spec)
            cpu_model.load_state_dict(state)
            save_model(out, cpu_model, self.cfg.model, self.spec, self.cfg.masking,
                       meta={"steps": step, "data": self.data_dir, "backend": self.backend.name,
                             "precision": self.precision, "world_size": self.ctx.world_size})
        barrier(self.ctx)
        return out

    def close(self) -> None:
        self.backend.close()


def _local_world_size() -> int:
    # torchrun exports LOCAL_WORLD_SIZE; the deepspeed launcher LOCAL_SIZE.
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))


def resume_target(run_dir: Path, resume: bool | str | Path, overwrite: bool, ctx: DistContext) -> Path | None:
    """Which checkpoint to resume from (None: a fresh run), decided on rank 0 and shared, so every rank
    agrees even without a shared filesystem view.  Raises TrainingSetupError on every rank."""
    decision: tuple[str, str] = ("fresh", "")
    if ctx.is_main:
        root = checkpoint_root(run_dir)
        existing = complete_checkpoints(root)
        if resume is True or resume == "latest":
            latest = latest_checkpoint(root)
            decision = ("resume", str(latest)) if latest else ("fresh", "")
            if latest is None:
                log.info("--resume: no checkpoint under %s yet; starting at step 0", root)
        elif resume:
            p = Path(resume)
            if not (p / "trainer_state.json").is_file():
                decision = ("error", f"{p}: not a complete checkpoint (no trainer_state.json)")
            else:
                decision = ("resume", str(p))
        elif existing:
            if overwrite:
                import shutil

                shutil.rmtree(root)
                log.warning("--overwrite: removed the checkpoints of an earlier run in %s", root)
            else:
                decision = ("error", f"{run_dir} holds checkpoints of an earlier run (up to step {existing[-1][0]}): "
                                     "pass --resume to continue it, --overwrite to start over, or choose another --out")
    kind, value = broadcast_object(decision, ctx)
    if kind == "error":
        raise TrainingSetupError(value)
    return Path(value) if kind == "resume" else None
