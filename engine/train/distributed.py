"""Process groups for training: one code path for one process, torchrun and the deepspeed launcher.

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
we join that group with ``env://``.  A plain ``python`` / ``userbert-engine pretrain`` process has
none of them and gets a one-member group on an in-process store: no port to pick, no mpi4py
(DeepSpeed would otherwise go looking for MPI), and the same collectives run everywhere.

Backends: NCCL on CUDA, gloo on CPU.  :func:`shutdown` destroys the group that :func:`init_distributed`
created (docs/TRAINING.md, Failures: a rare abort at exit was seen without it).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("userbert")

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" | "nccl"
    owns_group: bool  # True: we created the process group and destroy it in shutdown()
    exported_env: tuple[str, ...] = ()  # launcher variables we set for a single process (removed at shutdown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher exported it (1 for a plain process); readable before any init."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} in the environment is not an integer") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} in the environment: must be >= 1")
    return world


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: cuda if available, else cpu.  With several local ranks each takes ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device = {name!r} but CUDA is not available on this machine")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs")
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join (or create) the default process group and pick this rank's device."""
    world = launched_world_size()
    if world > 1:
        missing = [k for k in LAUNCHER_ENV if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} missing from the environment: "
                             "start the job with `deepspeed` or `torchrun`")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"

    if dist.is_initialized():  # an embedding application (or a test harness) set it up: use it as is
        if dist.get_world_size() != world:
            raise RuntimeError(f"a process group of size {dist.get_world_size()} exists, but WORLD_SIZE={world}")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend(), False)

    timeout = timedelta(seconds=timeout_s)
    exported: list[str] = []
    if world == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        # Libraries read the launcher's variables (DeepSpeed asserts LOCAL_RANK): tell them what a launcher would.
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            if key not in os.environ:
                os.environ[key] = value
                exported.append(key)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local_rank, device, backend, True, tuple(exported))


def shutdown(ctx: DistContext | None) -> None:
    """Destroy the process group we created.  Through DeepSpeed's wrapper when DeepSpeed ran, which
    also drops its cached sub-groups (a later run in the same process would find them stale)."""
    if ctx is None or not ctx.owns_group:
        return
    for key in ctx.exported_env:
        os.environ.pop(key, None)
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum over ranks (nothing to do for one rank)."""
    if ctx.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (small picklable values between our own processes only)."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
