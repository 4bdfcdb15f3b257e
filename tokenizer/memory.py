"""Returning freed memory to the OS between tokenizer phases."""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

_name = ctypes.util.find_library("c")
try:
    _LIBC = ctypes.CDLL(_name) if _name else None
    _TRIM = _LIBC.malloc_trim if _LIBC is not None and hasattr(_LIBC, "malloc_trim") else None  # glibc only
except OSError:
    _TRIM = None


def release_free_memory() -> None:
    """Hand memory that a finished phase freed back to the OS.

    Arrow's allocator and glibc's per-thread malloc arenas keep freed pages for reuse, so after the
    multi-threaded reading pass the process would carry that pass's peak into the words pass, and the
    ``--memory-limit`` budget (which counts each phase's own working memory) would not hold.
    """
    pa.default_memory_pool().release_unused()
    if _TRIM is not None:
        _TRIM(0)
