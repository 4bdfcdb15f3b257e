"""Small shared pieces of the Triton launchers (no kernels here; one op per file lives beside this).

- ``triton``/``tl`` are None when Triton cannot be imported, so that the op modules (whose torch
  references are the CPU path) import everywhere; :func:`jit` then leaves the kernel a plain
  function that is never launched (kernels/dispatch.py refuses ``impl="triton"`` first).
- Table-batched launches take *pointer arrays*: an int64 tensor of ``data_ptr()`` values, cast back
  to typed pointers inside the kernel (``tl.load(ptrs + k).to(tl.pointer_type(DTYPE))``, as Triton's
  grouped-GEMM tutorial does).  That lets one launch read K tensors of different shapes without
  concatenating them (a copy of every table, every step).  Building the array is a host-to-device
  copy that synchronises, so it is cached on the pointer values: parameters do not move.
"""

import functools
import os

import torch

from kernels.targets import capturing

try:  # Triton is a declared dependency; a broken or missing install leaves the torch path working.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None


def jit(fn=None, **kwargs):
    """``triton.jit`` when Triton is importable, else the function unchanged (never launched).
    ``@jit(do_not_specialize=[...])`` passes Triton's options: the kernels do not specialise on
    their row counts (M varies every batch; specialising on its divisibility by 16 would compile
    each kernel twice and buys nothing where it only bounds masks)."""
    if fn is None:
        return lambda f: jit(f, **kwargs)
    return triton.jit(fn, **kwargs) if triton is not None else fn


def helper(fn):
    """A @jit helper called from kernels; under the interpreter it stays a plain function, because
    there every call of a nested @jit function re-patches triton.language (measured ~5 ms a call,
    which made a 250-program test take 70 s).  Decided when the module is imported, like @jit itself
    (TRITON_INTERPRET must be set before the kernels are defined)."""
    return fn if interpreting() or triton is None else triton.jit(fn)


def _sum_py(x, axis):
    return tl.reduce(x, axis, tl.standard._sum_combine)


def _max_py(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


def _reductions():
    """``fsum(x, axis)`` and ``fmax(x, axis)`` for kernels: tl.sum / tl.max themselves on a GPU; under
    the interpreter the same tl.reduce they call, minus their own @jit frame (which costs a re-patch
    of triton.language per call there; the interpreter maps these combine functions to numpy)."""
    if triton is None:
        return None, None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _sum_py, _max_py

    @triton.jit
    def fsum(x, axis: tl.constexpr):
        return tl.sum(x, axis=axis)

    @triton.jit
    def fmax(x, axis: tl.constexpr):
        return tl.max(x, axis=axis)

    return fsum, fmax


fsum, fmax = _reductions()


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``).  False while the
    compile gate captures launches for a GPU target (kernels/targets.py): nothing runs then."""
    return capturing() is None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _ptr_array_cached(ptrs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    host = torch.tensor(ptrs, dtype=torch.int64)
    if device.type == "cuda":
        # pinned + non_blocking: no host sync even when the pointers change every step (ZeRO-3
        # gathers parameters into fresh buffers); the caching host allocator keeps the pinned
        # buffer alive until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def ptr_array(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 ``[len(tensors)]`` of the tensors' data pointers, on their device (cached; see above)."""
    return _ptr_array_cached(tuple(t.data_ptr() for t in tensors), tensors[0].device)


@functools.lru_cache(maxsize=256)
def _int_array_cached(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def int_array(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant index tensor (schedules, column maps), built once per (values, device)."""
    return _int_array_cached(tuple(int(v) for v in values), dtype, device)


TORCH_TO_TL = {} if tl is None else {
    torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    try:
        return TORCH_TO_TL[dtype]
    except KeyError:
        raise TypeError(f"no Triton kernel for dtype {dtype}; expected float32, float16 or bfloat16") from None
