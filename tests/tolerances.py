"""The one place for numerical tolerances (docs/KERNELS.md, Testing under the interpreter).

Two rules, both against a float64 reference computed from the same (already rounded) inputs:

- a reference in a given dtype:   |ref_lowp - ref64| <= ATOL[dtype] + RTOL[dtype] * |ref64|
- a kernel (three-way, later):    |kernel - ref64|   <= 2 * |ref_lowp - ref64| + ATOL[dtype]
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def _report(name: str, err: torch.Tensor, bound: torch.Tensor) -> str:
    worst = int((err - bound).argmax())
    return (f"{name}: {int((err > bound).sum())} of {err.numel()} elements out of tolerance; worst at flat "
            f"index {worst}: error {float(err[worst]):.3g} > bound {float(bound[worst]):.3g}")


def assert_close_to_ref64(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                          name: str = "output") -> None:
    """``|out - ref64| <= ATOL[dtype] + RTOL[dtype] * |ref64|`` elementwise; ``dtype`` picks the bounds."""
    assert out.shape == ref64.shape, f"{name}: shape {list(out.shape)} != reference {list(ref64.shape)}"
    err = (out.detach().double() - ref64.detach().double()).abs().flatten()
    bound = (ATOL[dtype] + RTOL[dtype] * ref64.detach().double().abs()).flatten()
    if err.numel():
        assert bool((err <= bound).all()), _report(name, err, bound)


def assert_kernel_close(kernel: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                        name: str = "output") -> None:
    """The three-way rule ``|kernel - ref64| <= 2 * |ref_lowp - ref64| + ATOL[dtype]``."""
    assert kernel.shape == ref64.shape == ref_lowp.shape, f"{name}: shapes differ"
    r64 = ref64.detach().double().flatten()
    err = (kernel.detach().double().flatten() - r64).abs()
    bound = 2 * (ref_lowp.detach().double().flatten() - r64).abs() + ATOL[dtype]
    if err.numel():
        assert bool((err <= bound).all()), _report(name, err, bound)
