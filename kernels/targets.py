"""What a launch heuristic may ask of the GPU it launches on: one small record per device.

The Triton launchers pick block sizes, warps and stages per dtype *and per target*: a tile that
fits an H100's 227 KiB of shared memory per block does not fit an A100's 163 KiB.  They read the
device's limits through :func:`gpu_props`:

- on a CUDA device: from the driver (``triton.runtime.driver``'s ``max_shared_mem``, the per-block
  opt-in limit Triton itself checks before a launch) and ``torch.cuda.get_device_properties``,
  once per device;
- while the compile gate (``benchmarks/compile_gate.py``) captures launches: from the target it
  names, through :func:`capture_target`.  Inside that context meta tensors count as GPU tensors,
  ``interpreting()`` is False and no kernel runs (the gate intercepts the launch), so the real
  launcher code chooses the configuration a GPU of that kind would get, without a GPU and without
  allocating anything.

No triton import here: kernels/dispatch.py imports this module on machines without Triton.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUProps:
    """The per-SM and per-block limits a launch configuration must respect (CUDA occupancy terms)."""

    name: str
    capability: int  # 80, 90, 100: major * 10 + minor
    shared_per_block: int  # bytes a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    shared_per_sm: int  # bytes per SM (cudaDevAttrMaxSharedMemoryPerMultiprocessor)
    sm_count: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # the runtime's per-block reservation (sm_80 and later)

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // 32


# The targets the compile gate checks (CUDA C Programming Guide, "Compute Capabilities" table).
TARGETS: dict[str, GPUProps] = {
    "sm_80": GPUProps("A100", 80, shared_per_block=166_912, shared_per_sm=167_936, sm_count=108),
    "sm_90": GPUProps("H100", 90, shared_per_block=232_448, shared_per_sm=233_472, sm_count=132),
    "sm_100": GPUProps("B200", 100, shared_per_block=232_448, shared_per_sm=233_472, sm_count=148),
}

_CAPTURE: GPUProps | None = None


def capturing() -> GPUProps | None:
    """The target whose launches are being captured (compile gate), else None."""
    return _CAPTURE


@contextlib.contextmanager
def capture_target(props: GPUProps):
    """Launchers see ``props`` as their device and treat meta tensors as GPU tensors (gate only)."""
    global _CAPTURE
    prev, _CAPTURE = _CAPTURE, props
    try:
        yield props
    finally:
        _CAPTURE = prev


def is_gpu(device: torch.device) -> bool:
    """A CUDA device, or a meta tensor's device while a launch capture is active."""
    return device.type == "cuda" or (_CAPTURE is not None and device.type == "meta")


def launch_device_type(device: torch.device) -> str:
    """The device type whose autocast / TF32 state applies to a launch on ``device``."""
    return "cuda" if is_gpu(device) else device.type


def gpu_props(device: torch.device) -> GPUProps | None:
    """The limits of the GPU a launch on ``device`` runs on; None off the GPU (CPU, interpreter)."""
    if _CAPTURE is not None and device.type in ("meta", "cuda"):
        return _CAPTURE
    if device.type != "cuda":
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _cuda_props(index: int) -> GPUProps:
    p = torch.cuda.get_device_properties(index)
    cap = p.major * 10 + p.minor
    known = {80: TARGETS["sm_80"], 90: TARGETS["sm_90"], 100: TARGETS["sm_100"]}.get(cap)
    shared_block = getattr(p, "shared_memory_per_block_optin", None)
    try:  # the limit Triton checks before launching (OutOfResources)
        from triton.runtime import driver

        shared_block = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # pragma: no cover - older triton, or no driver: torch's value
        pass
    if not shared_block:
        shared_block = known.shared_per_block if known else 48 * 1024
    shared_sm = getattr(p, "shared_memory_per_multiprocessor", None) or shared_block + 1024
    return GPUProps(
        name=p.name, capability=cap, shared_per_block=int(shared_block), shared_per_sm=int(shared_sm),
        sm_count=int(p.multi_processor_count),
        regs_per_sm=int(getattr(p, "regs_per_multiprocessor", 65536) or 65536),
        max_threads_per_sm=int(getattr(p, "max_threads_per_multi_processor", 2048) or 2048),
    )


def occupancy(props: GPUProps, regs_per_thread: int, num_warps: int, shared_bytes: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / the SM's maximum) of a kernel on ``props``.

    Registers are allocated per warp in units of 256; shared memory per block adds the runtime's
    1 KiB reservation.  0 blocks: the kernel cannot launch.
    """
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = (props.regs_per_sm // regs_per_warp) // num_warps
    by_threads = props.max_threads_per_sm // (num_warps * 32)
    if shared_bytes > props.shared_per_block:
        by_shared = 0
    elif shared_bytes:
        by_shared = props.shared_per_sm // (shared_bytes + props.reserved_shared_per_block)
    else:
        by_shared = props.max_blocks_per_sm
    blocks = max(0, min(by_regs, by_threads, by_shared, props.max_blocks_per_sm))
    return blocks, blocks * num_warps / props.max_warps_per_sm
