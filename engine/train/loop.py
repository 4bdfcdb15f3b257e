"""The training loop, one for both phases: pretraining (engine/train/pretrain.py) and fine-tuning
(engine/downstream/finetune.py) differ in their step module, their data and what they do between
steps, not in how a step runs.

    for each optimizer step:
        accumulation x  micro_step(batch)        forward + backward (the backend's: torch, DDP, DeepSpeed)
        one all-reduce of a small vector         every rank gets the same StepStats
        optimizer_step(skip=non-finite loss)     the update, or none
        after_step(stats)                        the phase: logging, evaluation, checkpoints, early stop

Decisions that need agreement (skip, abort, stop on a signal or a time limit) are taken from the
all-reduced numbers, so all ranks take them identically without a second collective.  The
components behind it are small protocols: :class:`Backend` (engine/train/backends.py) and the
phase's ``after_step`` callback.  docs/TRAINING.md describes the loop and its outputs.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from engine.train.distributed import DistContext

log = logging.getLogger("userbert")


class TrainingSetupError(ValueError):
    """The run cannot start as asked (existing checkpoints, an incompatible resume, ...)."""


class BadStepsError(FloatingPointError):
    """Too many consecutive non-finite losses or unrecoverable skipped updates."""


@dataclass
class StepOutcome:
    """What the backend's optimizer step did."""

    applied: bool  # the optimizer updated the weights
    grad_norm: float | torch.Tensor | None = None  # before clipping
    loss_scale: float | None = None  # fp16 only
    recoverable: bool = False  # a skipped step that the loss scaler handles (fp16 overflow above the minimum scale)


class Backend(Protocol):
    """How a step runs: plain torch (one process or DDP) or DeepSpeed (engine/train/backends.py)."""

    name: str

    def lr(self) -> float: ...

    def micro_step(self, inputs: tuple, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of one micro-batch: ``step_module(*inputs) -> (loss, stats)``."""

    def optimizer_step(self, skip: bool) -> StepOutcome: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""


@dataclass
class MicroBatch:
    """One micro-batch as the loop sees it: the step module's arguments and what it counts."""

    inputs: tuple  # on the device
    users: int
    tokens: int = 0


@dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and all ranks (the same on every rank)."""

    step: int  # 0-based index of this step
    lr: float  # the learning rate it ran at
    loss: float  # mean over micro-batches and ranks
    users: int
    tokens: int
    masked_words: float  # pretraining's masked words (0 in fine-tuning)
    data_wait_s: float  # time the step waited for data, mean over ranks
    heads: dict[str, float]  # per-head losses, mean over micro-batches and ranks
    update: StepOutcome
    signal: bool = False  # some rank received SIGTERM/SIGINT
    time_up: bool = False  # the wall-time limit passed

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)

    @property
    def stopping(self) -> bool:
        return self.signal or self.time_up


@dataclass
class LoopState:
    """What the loop carries from step to step (and a checkpoint across a resume)."""

    step: int = 0  # optimizer steps done
    skipped_steps: int = 0
    bad_steps: int = 0  # consecutive non-finite or unrecoverably skipped steps


# The all-reduced vector, in order; the per-head losses follow.
_REDUCED = ("loss", "signal", "time_up", "users", "tokens", "masked_words", "data_wait_s")


@dataclass
class Loop:
    """Where the loop runs and when it must give up or stop."""

    backend: Backend
    ctx: DistContext
    accumulation: int = 1
    heads: Sequence[str] = ()  # per-head loss keys of the step module's stats (pretraining)
    max_bad_steps: int = 5
    max_seconds: float = 0.0  # 0: no limit
    signals: Signals | None = None
    data_wait: Callable[[], float] = field(default=lambda: 0.0)  # seconds waited for data since the last call
    lr_key: str = "train.lr"  # the config key a too-many-bad-steps error suggests lowering
    resume_hint: str = ""  # ... and how to go on from there

    def run(self, batches: Iterator[MicroBatch], state: LoopState, steps: int,
            after_step: Callable[[StepStats], str | None]) -> str | None:
        """Optimizer steps from ``state.step`` up to ``steps``; returns why it stopped early (None: it did not):
        "signal", "time", or the reason ``after_step`` gave."""
        ctx, acc, heads = self.ctx, self.accumulation, list(self.heads)
        start = time.perf_counter()
        while state.step < steps:
            lr = self.backend.lr()
            loss_acc = torch.zeros((), device=ctx.device)
            head_acc = np.zeros(len(heads))
            users = tokens = masked = 0
            for micro in range(acc):
                mb = next(batches)
                users += mb.users
                tokens += mb.tokens
                loss, stats = self.backend.micro_step(mb.inputs, micro)
                loss_acc += loss.float()
                head_acc += [stats.get(h, 0.0) for h in heads]
                masked += stats.get("masked_words", 0.0)
            timed_out = bool(self.max_seconds) and time.perf_counter() - start > self.max_seconds
            got_signal = self.signals is not None and self.signals.received is not None
            # One all-reduce of everything the ranks must agree on (the loss goes in at full precision).
            vec = torch.tensor([0.0, float(got_signal), float(timed_out), users, tokens, masked, self.data_wait(),
                                *(head_acc / acc)], dtype=torch.float64, device=ctx.device)
            vec[0] = loss_acc.double() / acc
            g = dict(zip(_REDUCED + tuple(heads), self.backend.all_reduce(vec).tolist()))
            step_loss = g["loss"] / ctx.world_size
            update = self.backend.optimizer_step(skip=not math.isfinite(step_loss))
            stats = StepStats(state.step, lr, step_loss, int(g["users"]), int(g["tokens"]), g["masked_words"],
                              g["data_wait_s"] / ctx.world_size, {h: g[h] / ctx.world_size for h in heads}, update,
                              signal=g["signal"] > 0, time_up=g["time_up"] > 0)
            self._check(stats, state)
            state.step += 1
            reason = after_step(stats)
            if stats.signal:
                return "signal"
            if stats.time_up:
                if ctx.is_main:
                    log.info("train.max_seconds = %s reached at step %d", self.max_seconds, state.step)
                return "time"
            if reason:
                return reason
        return None

    def _check(self, s: StepStats, state: LoopState) -> None:
        """Count skipped and bad steps; raise after too many bad ones in a row."""
        if not s.finite and s.update.applied:
            raise BadStepsError(f"step {s.step}: non-finite loss {s.loss}, and DeepSpeed in fp32 does "
                                "not skip such updates, so the weights are now corrupt. Resume from the "
                                "last checkpoint with a bf16 config or a lower train.lr")
        if not s.update.applied:
            state.skipped_steps += 1
        bad = not s.finite or (not s.update.applied and not s.update.recoverable)
        state.bad_steps = state.bad_steps + 1 if bad else 0
        if bad and self.ctx.is_main:
            log.warning("step %d: %s; update skipped (%d consecutive)", s.step,
                        f"non-finite loss {s.loss}" if not s.finite else "non-finite gradients", state.bad_steps)
        if state.bad_steps >= self.max_bad_steps:
            raise BadStepsError(
                f"{state.bad_steps} consecutive bad steps (non-finite loss or gradients; the last at step "
                f"{s.step}, loss {s.loss}): the run stops. Lower {self.lr_key}, check the data"
                + (f", or {self.resume_hint}" if self.resume_hint else ""))


class Signals:
    """SIGTERM/SIGINT set a flag that the loop reads between steps (the phase then saves a checkpoint
    and stops); a second signal falls back to the previous handler.  Main thread only."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
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

    @property
    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGTERM).name

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
