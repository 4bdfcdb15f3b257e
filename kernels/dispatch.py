"""Choosing an implementation per call: ``impl="auto" | "triton" | "torch"`` (docs/KERNELS.md).

- ``"torch"``: the pure-torch reference, which is also the CPU production path.
- ``"auto"``: Triton when every input tensor is on CUDA, Triton is importable and the op has a
  registered Triton implementation; torch otherwise.  ``auto`` never raises for availability.
- ``"triton"``: Triton or a clear :class:`KernelUnavailableError` saying why not.  On CPU tensors
  Triton only runs in its interpreter, which needs ``TRITON_INTERPRET=1`` set before any
  ``@triton.jit`` function is defined (the root conftest.py does that for tests).

Each op module registers its Triton implementation with :func:`register_triton` once the kernel
exists, so ``auto`` starts using it without touching the callers.  Kernels never import engine/.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Literal

import torch

from kernels.targets import is_gpu

IMPLS = ("auto", "triton", "torch")

_TRITON_OPS: set[str] = set()


class KernelUnavailableError(RuntimeError):
    """An explicit ``impl="triton"`` that cannot run here."""


class TritonNotImplementedError(KernelUnavailableError, NotImplementedError):
    """The op has no Triton implementation yet (both a RuntimeError and a NotImplementedError)."""


def register_triton(op: str) -> None:
    """Declare that ``op`` has a working Triton implementation (called by the op's module)."""
    _TRITON_OPS.add(op)


def triton_registered(op: str) -> bool:
    return op in _TRITON_OPS


_IMPORTABLE: bool | None = None


def triton_importable() -> bool:
    """True when ``import triton`` works (imported once, on first need: it takes ~1 s).

    Memoised in a module global rather than functools.cache: torch.compile traces resolve_impl, and
    dynamo guards on a global's value but warns about (and traces through) cache wrappers.
    """
    global _IMPORTABLE
    if _IMPORTABLE is None:
        _IMPORTABLE = _try_import_triton()
    return _IMPORTABLE


def _try_import_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is "not importable", whatever it raises
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _flat_tensors(items: Iterable) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for x in items:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_flat_tensors(x))
        # None (an absent optional input) and scalars say nothing about the device
    return out


def resolve_impl(impl: str, *tensors, op: str | None = None) -> Literal["triton", "torch"]:
    """Pick ``"triton"`` or ``"torch"`` for a call on ``tensors`` (tensors, lists of them, or None).

    ``op`` names the kernel (e.g. ``"gather_concat_mean"``); when given, Triton counts as available
    only if that op registered a Triton implementation.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    ts = _flat_tensors(tensors)
    on_cuda = bool(ts) and all(is_gpu(t.device) for t in ts)  # meta counts while the compile gate captures
    if impl == "auto":
        ok = on_cuda and triton_importable() and (op is None or triton_registered(op))
        return "triton" if ok else "torch"

    # impl == "triton": explain exactly what is missing.
    what = f"{op}: " if op else ""
    if not triton_importable():
        raise KernelUnavailableError(f"{what}impl='triton' but triton is not importable here; "
                                     "use impl='torch' or impl='auto'")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in ts}) or ["no tensors"]
        raise KernelUnavailableError(
            f"{what}impl='triton' needs CUDA tensors (got {', '.join(devices)}) or Triton's CPU "
            "interpreter (set TRITON_INTERPRET=1 before importing the kernels); "
            "use impl='torch' or impl='auto'")
    if op is not None and not triton_registered(op):
        raise TritonNotImplementedError(f"{op}: the Triton kernel is not implemented yet; "
                                        "use impl='torch' or impl='auto'")
    return "triton"
