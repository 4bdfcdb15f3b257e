"""The LLVM intrinsics collate uses from Numba: memcpy of array ranges and the prefetch hint."""

import numpy as np
import pytest
from numba import njit

from engine.data.intrinsics import copy_items, prefetch


@njit
def _copy(dst, i, src, j, n):
    copy_items(dst, i, src, j, n)


@njit
def _sum_with_hints(a):
    total = 0
    for i in range(a.shape[0]):
        prefetch(a, min(i + 16, a.shape[0] - 1))
        total += a[i]
    return total


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8])
def test_copy_items_copies_exactly_the_range(dtype):
    rng = np.random.default_rng(0)
    for _ in range(20):
        src = rng.integers(0, 100, rng.integers(1, 300)).astype(dtype)
        dst = np.full(rng.integers(1, 300), -1 if dtype != np.uint8 else 255, dtype=dtype)
        n = int(rng.integers(0, min(len(src), len(dst)) + 1))
        j = int(rng.integers(0, len(src) - n + 1))
        i = int(rng.integers(0, len(dst) - n + 1))
        expected = dst.copy()
        expected[i:i + n] = src[j:j + n]
        _copy(dst, i, src, j, n)
        assert np.array_equal(dst, expected)


def test_copy_items_refuses_strided_arrays():
    a = np.arange(10, dtype=np.int64)
    with pytest.raises(Exception, match="copy_items"):
        _copy(np.zeros(10, dtype=np.int64), 0, a[::2], 0, 3)


def test_prefetch_is_only_a_hint():
    """It emits LLVM's prefetch (read, keep in all cache levels, data) and changes neither data nor result."""
    a = np.arange(1000, dtype=np.int64)
    before = a.copy()
    assert _sum_with_hints(a) == a.sum()
    assert np.array_equal(a, before)
    ir = "\n".join(_sum_with_hints.inspect_llvm().values())
    calls = [line for line in ir.splitlines() if "call" in line and "@llvm.prefetch" in line]
    assert calls, "no llvm.prefetch call in the compiled code"
    assert all("i32 0, i32 3, i32 1" in line for line in calls), calls


def test_prefetch_refuses_other_arguments():
    @njit
    def on_a_matrix(a):
        prefetch(a, 0)

    with pytest.raises(Exception, match="prefetch"):
        on_a_matrix(np.zeros((2, 2)))
