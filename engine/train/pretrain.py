"""Masked multi-label pretraining: one entry point for a single process, torchrun and the deepspeed launcher.

``pretrain(cfg, data_dir, run_dir)`` checks everything it can before any work, joins (or creates)
the process group, builds a :class:`Pretraining` (model, optimizer, backend, data), runs the
training loop (engine/train/loop.py), exports the model and destroys the group.

Run directory layout::

    RUNDIR/config.json          the resolved run config (DeepSpeed's choices applied)
    RUNDIR/ds_config.json       the resolved DeepSpeed config (DeepSpeed runs only)
    RUNDIR/metrics.jsonl        one line per logged step: loss (total and per head), lr, grad norm, loss scale,
                                users/s, tokens/s, data wait, memory
    RUNDIR/tensorboard/         the same scalars for TensorBoard
    RUNDIR/loss.png             loss curve, written at the end
    RUNDIR/checkpoints/         resume checkpoints (engine/train/checkpoints.py), the last K kept
    RUNDIR/model/               exported weights (safetensors, fp32) + model.json, for finetune and embed
    RUNDIR/model_step<N>/       the same at step N, for each N in train.export_steps
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from common.atomic import atomic_write_bytes
from engine.config import MaskingConfig, RunConfig, VocabSpec
from engine.data.collate import CollateConfig, Collator
from engine.data.loader import BatchLayout, TrainBatches, TrainLoader, auto_workers, batch_layout
from engine.model.export import save_model
from engine.model.userbert import UserBERT, user_attr_offsets
from engine.train.backends import DeepSpeedBackend, TorchBackend, import_deepspeed
from engine.train.checkpoints import (
    checkpoint_root,
    data_fingerprint,
    load_rng,
    prune,
    read_state,
    resume_target,
    save_rng,
    tag_for,
    write_state,
)
from engine.train.distributed import (
    DistContext,
    barrier,
    init_distributed,
    launched_world_size,
    resolve_device,
    shutdown,
)
from engine.train.loop import Loop, LoopState, MicroBatch, Signals, StepStats, TrainingSetupError
from engine.train.optim import build_optimizer, build_scheduler
from engine.train.telemetry import MetricsLogger, Progress, memory_stats, plot_loss_curve
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
    empty_steps: int = 0  # steps with no masked word (nothing to predict): 0 unless masking is off


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
    device = resolve_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolved = None
    if deepspeed_config is not None:
        from engine.train.deepspeed_config import load_ds_json, resolve_ds_config

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
    rows = _users_with_words(data, spec, None if users is None else np.asarray(users, dtype=np.int64))
    n_rows = len(rows)
    if n_rows < layout.global_batch:
        raise ValueError(f"{data_dir}: {n_rows} users cannot fill one global batch of {layout.global_batch}")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)

    ctx = init_distributed(tc.device)
    run = None
    try:
        resume_from = resume_target(run_dir, resume, overwrite, ctx)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
            if resolved is not None:
                atomic_write_bytes(run_dir / "ds_config.json", json.dumps(resolved.config, indent=2))
                log.info("deepspeed config: %s", json.dumps(resolved.config, sort_keys=True))
            cfg.log(log)
        run = Pretraining(cfg, data, spec, run_dir, ctx, layout, resolved_ds=resolved, resume=resume_from, rows=rows,
                          progress=progress, data_dir=str(data_dir))
        out = run.run()
    finally:
        if run is not None:
            run.close()
        shutdown(ctx)
    ups = out.users / max(out.seconds, 1e-9)
    if ctx.is_main:
        how = f"stopped by {out.stopped}" if out.stopped else "done"
        log.info("pretrained steps %d..%d in %.1f s (%.0f users/s), %s; model in %s, checkpoint %s", out.start_step,
                 out.end_step, out.seconds, ups, how, out.model_dir, out.checkpoint)
    result = PretrainResult(run_dir, out.model_dir, out.end_step - out.start_step, out.seconds, ups, out.losses,
                            out.start_step, out.end_step, out.stopped, out.checkpoint, out.skipped_steps,
                            "deepspeed" if resolved is not None else "torch", out.empty_steps)
    if out.stopped:
        raise TrainingInterrupted(result)
    return result


def _users_with_words(data, spec: VocabSpec, rows: np.ndarray | None) -> np.ndarray:
    """The users (dataset rows) to pretrain on: those with at least one behaviour word.  A user with
    none (a user-table row with no events) has nothing to predict; kept, such users also fill whole
    batches under length grouping, steps with no masked word at all (seen on MovieLens)."""
    n_words = sum(np.diff(np.asarray(data.segment(s.name).user_word_offsets)) for s in spec.segments)
    rows = np.arange(data.num_users, dtype=np.int64) if rows is None else rows
    keep = rows[n_words[rows] > 0]
    if len(keep) < len(rows):
        log.info("%d of %d users have no behaviour word: left out of pretraining (nothing to predict)",
                 len(rows) - len(keep), len(rows))
    return keep


class PretrainStep(nn.Module):
    """What DDP and DeepSpeed wrap: ``forward(batch) -> (loss, stats)`` (their hooks run on forward)."""

    def __init__(self, model: UserBERT, masking: MaskingConfig):
        super().__init__()
        self.model = model
        self.masking = masking

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.pretrain_loss(batch, self.masking)


@dataclass
class RunOutcome:
    start_step: int
    end_step: int
    seconds: float
    users: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    empty_steps: int = 0
    stopped: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    checkpoint: Path | None = None  # the last checkpoint written
    model_dir: Path | None = None


class Pretraining:
    """The pretraining phase: model, optimizer and backend; its data; and what happens between steps
    (metrics, progress, checkpoints).  The steps themselves run in :class:`engine.train.loop.Loop`."""

    def __init__(self, cfg: RunConfig, data, spec: VocabSpec, run_dir: Path, ctx: DistContext, layout: BatchLayout,
                 *, resolved_ds=None, resume: Path | None = None, rows: np.ndarray | None = None,
                 progress: bool = True, data_dir: str = ""):
        self.cfg, self.data, self.spec, self.run_dir, self.ctx, self.layout = cfg, data, spec, run_dir, ctx, layout
        self.tc = tc = cfg.train
        self.rows, self.progress, self.data_dir = rows, progress, data_dir
        self.root = checkpoint_root(run_dir)
        self.fingerprint = data_fingerprint(data.manifest, rows)

        backend_name = DeepSpeedBackend.name if resolved_ds is not None else TorchBackend.name
        saved = self._check_resumable(resume, backend_name) if resume is not None else None  # before any work

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = UserBERT(cfg.model, spec).to(ctx.device)
        if ctx.is_main:
            log.info("model: %.2fM parameters on %s x %d; %d users; global batch %d = %d x %d accumulation x %d ranks",
                     self.model.num_parameters() / 1e6, ctx.device, ctx.world_size,
                     data.num_users if rows is None else len(rows),
                     layout.global_batch, layout.micro_batch, layout.accumulation, ctx.world_size)
        step_module = PretrainStep(self.model, cfg.masking)
        if resolved_ds is not None:
            rt = resolved_ds.train
            optimizer = build_optimizer(self.model, rt.lr, rt.betas, rt.weight_decay, rt.eps,
                                        fused=True if ctx.device.type == "cuda" else None)
            self.backend = DeepSpeedBackend(step_module, optimizer, ctx, resolved_ds.config,
                                            scheduler=build_scheduler(optimizer, rt), precision=resolved_ds.precision,
                                            min_loss_scale=resolved_ds.min_loss_scale, weights=self.model)
            self.precision = resolved_ds.precision
        else:
            optimizer = build_optimizer(self.model, tc.lr, tc.betas, tc.weight_decay, tc.eps,
                                        fused=ctx.device.type in ("cuda", "cpu") or None)
            self.backend = TorchBackend(step_module, optimizer, ctx, scheduler=build_scheduler(optimizer, tc),
                                        accumulation=layout.accumulation, precision=tc.precision,
                                        grad_clip=tc.grad_clip, clip_params=self.model.parameters(),
                                        weights=self.model)
            self.precision = tc.precision
        # Dropout differs between ranks; the stream is a function of (seed, rank) and restored on resume.
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, ctx.rank, 1]).generate_state(1)[0]))

        self.state = LoopState()
        self.empty_steps = 0  # steps whose batches had no masked word (counted, and warned about at the end)
        self.pending: list[float] = []  # losses since the last metrics record (carried across a resume)
        self.users_before = 0
        if saved is not None:
            self._load(resume, saved)
        self.start_step = self.state.step
        self.users_seen = self.users_before

    # -------------------------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        return {"step": self.state.step, "backend": self.backend.name, "precision": self.precision,
                "world_size": self.ctx.world_size, "global_batch": self.layout.global_batch,
                "micro_batch": self.layout.micro_batch, "accumulation": self.layout.accumulation,
                "seed": self.tc.seed, "group_by_length": self.tc.group_by_length, "data": self.fingerprint,
                "steps": self.tc.steps, "pending_losses": self.pending, "skipped_steps": self.state.skipped_steps,
                "bad_steps": self.state.bad_steps, "users_seen": self.users_seen, "empty_steps": self.empty_steps}

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

    def _load(self, ckpt: Path, saved: dict[str, Any]) -> None:
        self.backend.load(ckpt.parent, ckpt.name)
        load_rng(ckpt, self.ctx.rank)
        self.state = LoopState(int(saved["step"]), int(saved.get("skipped_steps", 0)), int(saved.get("bad_steps", 0)))
        self.pending = list(saved.get("pending_losses", []))
        self.users_before = int(saved.get("users_seen", 0))
        self.empty_steps = int(saved.get("empty_steps", 0))
        if saved.get("steps") != self.tc.steps and self.ctx.is_main:
            log.warning("train.steps changed from %s to %d since the checkpoint: the learning-rate schedule follows "
                        "the new value", saved.get("steps"), self.tc.steps)
        if self.ctx.is_main:
            log.info("resumed from %s (step %d)", ckpt, self.state.step)

    def save(self) -> Path:
        """A checkpoint of the state after ``self.state.step`` optimizer steps.  Collective: every rank calls."""
        d = self.root / tag_for(self.state.step)
        if self.ctx.is_main:
            d.mkdir(parents=True, exist_ok=True)
            (d / "trainer_state.json").unlink(missing_ok=True)  # incomplete until rewritten below
        barrier(self.ctx)
        self.backend.save(self.root, d.name)
        save_rng(d, self.ctx.rank)
        barrier(self.ctx)
        if self.ctx.is_main:
            write_state(d, self._state())
            removed = prune(self.root, self.tc.keep_checkpoints)
            log.info("checkpoint %s%s", d, f" (removed {len(removed)} older)" if removed else "")
        barrier(self.ctx)
        return d

    # ------------------------------------------------------------------------------------- the run

    def batches(self, loader: TrainLoader, pin: bool) -> Iterator[MicroBatch]:
        for batch in loader:
            users, tokens = batch.batch_size, int(batch.seq_lens.sum())
            if self.ctx.device.type != "cpu":
                batch = batch.to(self.ctx.device, non_blocking=pin)
            yield MicroBatch((batch,), users, tokens)

    def run(self) -> RunOutcome:
        tc, ctx, layout, main = self.tc, self.ctx, self.layout, self.ctx.is_main
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
        if self.cfg.model.user_bag_weight > 0:
            heads.append("loss/user_bag")
        if self.cfg.model.contrastive_weight > 0:
            heads.append("loss/contrastive")
        if main:
            log.info("training steps %d..%d on %s (%s, %s), %d loader threads%s", self.start_step, tc.steps,
                     self.backend.name, self.precision, ctx.backend, workers, ", pinned" if pin else "")

        outcome = RunOutcome(self.start_step, self.start_step, 0.0, 0)
        seen = {"users": 0, "tokens": 0, "wait": 0.0}
        start = last_log = time.perf_counter()

        def after_step(s: StepStats) -> None:
            nonlocal last_log
            step = s.step + 1
            seen["users"] += s.users
            seen["tokens"] += s.tokens
            seen["wait"] += s.data_wait_s
            outcome.losses.append(s.loss)
            if s.masked_words == 0:
                self.empty_steps += 1
            if s.finite:
                self.pending.append(s.loss)
            self.users_seen = self.users_before + seen["users"]
            bar.update(1)
            if s.step % tc.log_every == 0 or step == tc.steps:
                now = time.perf_counter()
                elapsed = max(now - start, 1e-9)
                record = {
                    "loss": sum(self.pending) / len(self.pending) if self.pending else s.loss,
                    "step_loss": s.loss, "lr": s.lr,
                    "grad_norm": float(s.update.grad_norm) if s.update.grad_norm is not None else float("nan"),
                    "users_per_s": seen["users"] / elapsed, "tokens_per_s": seen["tokens"] / elapsed,
                    "data_wait_s": seen["wait"], "data_wait_frac": seen["wait"] / max(now - last_log, 1e-9),
                    "skipped_steps": self.state.skipped_steps, "masked_words": s.masked_words,
                    "empty_steps": self.empty_steps,
                    "epoch": s.step // dataset.per_epoch, **s.heads, **memory_stats(ctx.device),
                }
                if s.update.loss_scale is not None:
                    record["loss_scale"] = s.update.loss_scale
                metrics.log(s.step, record)
                bar.show(record)
                self.pending, seen["wait"], last_log = [], 0.0, now
            if not s.stopping and tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                outcome.checkpoint = self.save()
            if step in tc.export_steps and step < tc.steps:
                self.export(step, self.run_dir / f"model_step{step}")

        self.model.train()
        # The handlers stay through the final checkpoint and export: a signal there is noted, not fatal.
        with Signals() as signals:
            loop = Loop(self.backend, ctx, accumulation=layout.accumulation, heads=heads,
                        max_bad_steps=tc.max_bad_steps, max_seconds=tc.max_seconds, signals=signals,
                        data_wait=loader.take_wait,
                        resume_hint=f"resume from the last checkpoint in {self.root} with --resume")
            try:
                stop = loop.run(self.batches(iter(loader), pin), self.state, tc.steps, after_step)
            finally:
                loader.close()
                bar.close()
                metrics.close()
            outcome.stopped = signals.name if stop == "signal" else None
            outcome = self._finish(outcome, start, seen["users"])
        return outcome

    def _finish(self, outcome: RunOutcome, start: float, users_seen: int) -> RunOutcome:
        step = self.state.step
        outcome.end_step = step
        outcome.seconds = time.perf_counter() - start
        outcome.users = users_seen
        outcome.skipped_steps = self.state.skipped_steps
        outcome.empty_steps = self.empty_steps
        if self.empty_steps and self.ctx.is_main:
            log.warning("%d of %d steps had no masked word (nothing to predict, loss 0): masking.select_prob = %s",
                        self.empty_steps, step, self.cfg.masking.select_prob)
        if outcome.stopped or self.tc.checkpoint_at_end:
            if outcome.checkpoint is None or outcome.checkpoint.name != tag_for(step):
                outcome.checkpoint = self.save()
        if not outcome.stopped:
            outcome.model_dir = self.export(step)
        if self.ctx.is_main:
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return outcome

    def export(self, step: int, out: Path | None = None) -> Path:
        """fp32 weights as safetensors + model.json in RUNDIR/model, or ``out`` (for finetune and embed)."""
        state = self.backend.full_state_dict()  # collective
        out = out or self.run_dir / "model"
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
