"""Spill files: the reading pass's events, partitioned by user hash, on disk.

Each reading task writes one file of blocks.  A block holds rows of one (stream, partition),
where a stream is a segment or the user table, column after column:

    first   int64 [n]      event time: seconds since the segment's window start << 32 | microseconds
                           (user table: the row's sequence number)
    key     int64 [n]      user id  (string ids: int32 offsets [n+1] rebased to 0, then the bytes)
    codes   int32 [n, K]   attribute codes of the task's value tables (0 = null)

The block index (stream, partition, byte offset, rows, key bytes) is kept in memory and saved
with the task's result, so that the words pass reads exactly its partitions' blocks, in task
order and, within a task, in input order: concatenated, they are the partition's rows in input
order, which the stable sort relies on.

Spill files are scratch: they are not fsync'ed (a killed process loses nothing the page cache
holds); a task whose file is shorter than its recorded size is redone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numba import njit

INDEX_COLUMNS = ("stream", "partition", "offset", "rows", "key_bytes")


@njit(cache=True, nogil=True, inline="always")
def _partition_bounds(part: np.ndarray, n_parts: int) -> np.ndarray:  # pragma: no cover - compiled
    """int64 [n_parts+1]: where each partition's rows start once grouped (part -1 = skip)."""
    bounds = np.zeros(n_parts + 1, np.int64)
    for i in range(part.shape[0]):
        if part[i] >= 0:
            bounds[part[i] + 1] += 1
    for p in range(n_parts):
        bounds[p + 1] += bounds[p]
    return bounds


@njit(cache=True, nogil=True)
def scatter_fixed(
    part: np.ndarray, n_parts: int, first: np.ndarray, keys: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Rows grouped by partition (stable; part -1 = skip): (bounds [n_parts+1], first, keys, codes)."""
    bounds = _partition_bounds(part, n_parts)
    m = bounds[n_parts]
    k = codes.shape[1]
    f_out = np.empty(m, np.int64)
    k_out = np.empty(m, np.int64)
    c_out = np.empty((m, k), np.int32)
    fill = bounds[:-1].copy()
    for i in range(part.shape[0]):
        p = part[i]
        if p < 0:
            continue
        j = fill[p]
        fill[p] = j + 1
        f_out[j] = first[i]
        k_out[j] = keys[i]
        for q in range(k):
            c_out[j, q] = codes[i, q]
    return bounds, f_out, k_out, c_out


@njit(cache=True, nogil=True)
def partition_order(part: np.ndarray, n_parts: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Stable counting sort of rows by partition (-1: skip): (row order, offsets [n_parts+1])."""
    counts = _partition_bounds(part, n_parts)
    fill = counts[:-1].copy()
    order = np.empty(counts[n_parts], np.int64)
    for i in range(part.shape[0]):
        p = part[i]
        if p >= 0:
            order[fill[p]] = i
            fill[p] += 1
    return order, counts


@njit(cache=True, nogil=True)
def take_rows_i64(a: np.ndarray, order: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(order.shape[0], np.int64)
    for i in range(order.shape[0]):
        out[i] = a[order[i]]
    return out


@njit(cache=True, nogil=True)
def take_rows_2d(a: np.ndarray, order: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty((order.shape[0], a.shape[1]), np.int32)
    for i in range(order.shape[0]):
        r = order[i]
        for k in range(a.shape[1]):
            out[i, k] = a[r, k]
    return out


@njit(cache=True, nogil=True)
def take_strings(
    offsets: np.ndarray, data: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Strings ``order`` of an (offsets, data) array, as int64 offsets [m+1] and bytes."""
    m = order.shape[0]
    out_off = np.zeros(m + 1, np.int64)
    for i in range(m):
        r = order[i]
        out_off[i + 1] = out_off[i] + offsets[r + 1] - offsets[r]
    out = np.empty(out_off[m], np.uint8)
    for i in range(m):
        r = order[i]
        s = offsets[r]
        base = out_off[i]
        for j in range(offsets[r + 1] - s):
            out[base + j] = data[s + j]
    return out_off, out


@dataclass
class Block:
    """Rows of one (stream, partition) of one chunk, ready to append."""

    first: np.ndarray  # int64 [n]
    keys: np.ndarray  # int64 [n], or uint8 bytes for string ids
    key_offsets: np.ndarray | None  # int64 [n+1] for string ids
    codes: np.ndarray  # int32 [n, K]

    @property
    def rows(self) -> int:
        return len(self.first)


def concat_blocks(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    first = np.concatenate([b.first for b in blocks])
    codes = np.concatenate([b.codes for b in blocks])
    if blocks[0].key_offsets is None:
        return Block(first, np.concatenate([b.keys for b in blocks]), None, codes)
    offs, base = [np.zeros(1, np.int64)], 0
    for b in blocks:
        offs.append(b.key_offsets[1:] + base)
        base += int(b.key_offsets[-1])
    return Block(first, np.concatenate([b.keys for b in blocks]), np.concatenate(offs), codes)


@dataclass
class SpillWriter:
    """Appends blocks to one task's spill file, buffering small ones per (stream, partition).

    With ``path=None`` the blocks stay in memory (``blocks``; the index's offset is the block
    number): inputs that fit the memory budget are not written to disk and read back.
    """

    path: Path | None
    min_block_rows: int = 1 << 16
    max_pending_bytes: int = 64 << 20
    index: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    _f: BinaryIO | None = None
    _pos: int = 0
    _pending: dict[tuple[int, int], list[Block]] = field(default_factory=dict)
    _pending_rows: dict[tuple[int, int], int] = field(default_factory=dict)
    _pending_bytes: int = 0

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "wb")

    def add(self, stream: int, partition: int, block: Block) -> None:
        key = (stream, partition)
        self._pending.setdefault(key, []).append(block)
        self._pending_rows[key] = self._pending_rows.get(key, 0) + block.rows
        self._pending_bytes += block.first.nbytes + block.keys.nbytes + block.codes.nbytes
        if self._pending_rows[key] >= self.min_block_rows:
            self._flush(key)
        if self._pending_bytes > self.max_pending_bytes:
            self.flush()

    def _flush(self, key: tuple[int, int]) -> None:
        blocks = self._pending.pop(key, [])
        self._pending_rows.pop(key, None)
        if not blocks:
            return
        b = concat_blocks(blocks)
        self._pending_bytes -= sum(x.first.nbytes + x.keys.nbytes + x.codes.nbytes for x in blocks)
        if self._f is None:
            key_bytes = b.keys.nbytes + (4 * (b.rows + 1) if b.key_offsets is not None else 0)
            self.index.append((key[0], key[1], len(self.blocks), b.rows, key_bytes))
            self.blocks.append(b)
            self._pos += b.first.nbytes + key_bytes + b.codes.nbytes
            return
        start = self._pos
        parts = [b.first]
        if b.key_offsets is not None:
            parts += [b.key_offsets.astype(np.int32), b.keys]
            key_bytes = 4 * (b.rows + 1) + b.keys.nbytes
        else:
            parts.append(b.keys)
            key_bytes = b.keys.nbytes
        parts.append(np.ascontiguousarray(b.codes, dtype=np.int32))
        for arr in parts:
            self._f.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
            self._pos += arr.nbytes
        self.index.append((key[0], key[1], start, b.rows, key_bytes))

    def flush(self) -> None:
        for key in sorted(self._pending):  # sorted: the file layout does not depend on dict order
            self._flush(key)
        self._pending_bytes = 0

    def close(self) -> int:
        """Flush everything; returns the file size (in memory: the bytes held)."""
        self.flush()
        if self._f is not None:
            self._f.close()
        return self._pos

    def abort(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()

    def index_array(self) -> np.ndarray:
        return np.array(self.index, np.int64).reshape(-1, len(INDEX_COLUMNS))


@dataclass
class StreamRows:
    """A partition's rows of one stream, read back from every task's spill file."""

    first: np.ndarray  # int64 [n]
    keys: np.ndarray  # int64 [n] or uint8 bytes
    key_offsets: np.ndarray | None  # int64 [n+1] for string ids
    codes: np.ndarray  # int32 [n, K]
    task_bounds: np.ndarray  # int64 [T+1]: rows of task t are task_bounds[t]:[t+1]

    @property
    def rows(self) -> int:
        return len(self.first)


Spill = tuple["Path | list[Block]", np.ndarray]  # a task's spill file (or in-memory blocks) and its index


def read_stream(spills: list[Spill], stream: int, partitions: range, n_codes: int, string_ids: bool) -> StreamRows:
    """Rows of ``stream`` in ``partitions`` from each task's (spill, index), in task order."""
    sel = []
    total = key_total = 0
    for _, index in spills:
        if len(index):
            m = (index[:, 0] == stream) & (index[:, 1] >= partitions.start) & (index[:, 1] < partitions.stop)
            rows = index[m]
        else:
            rows = index
        sel.append(rows)
        total += int(rows[:, 3].sum()) if len(rows) else 0
        if string_ids and len(rows):
            key_total += int((rows[:, 4] - 4 * (rows[:, 3] + 1)).sum())
    first = np.empty(total, np.int64)
    codes = np.empty((total, n_codes), np.int32)
    keys = np.empty(key_total if string_ids else total, np.uint8 if string_ids else np.int64)
    key_offsets = np.zeros(total + 1, np.int64) if string_ids else None
    bounds = np.zeros(len(spills) + 1, np.int64)
    pos = kpos = 0
    for t, ((path, _), rows) in enumerate(zip(spills, sel)):
        if len(rows):
            # Blocks of a task, in file order = the order they were written = input order
            # within each partition.  Partitions are read in ascending order.
            order = np.lexsort((rows[:, 2], rows[:, 1]))
            if not isinstance(path, Path):
                for _, _, block_no, n, _ in rows[order]:
                    b = path[int(block_no)]
                    first[pos : pos + n] = b.first
                    codes[pos : pos + n] = b.codes
                    if string_ids:
                        nb = len(b.keys)
                        keys[kpos : kpos + nb] = b.keys
                        key_offsets[pos + 1 : pos + n + 1] = b.key_offsets[1:] + kpos
                        kpos += nb
                    else:
                        keys[pos : pos + n] = b.keys
                    pos += int(n)
                bounds[t + 1] = pos
                continue
            with open(path, "rb") as f:
                for _, _, offset, n, key_bytes in rows[order]:
                    f.seek(int(offset))
                    _read_into(f, first[pos : pos + n])
                    if string_ids:
                        offs = np.empty(n + 1, np.int32)
                        _read_into(f, offs)
                        nb = int(key_bytes) - 4 * (n + 1)
                        _read_into(f, keys[kpos : kpos + nb])
                        key_offsets[pos + 1 : pos + n + 1] = offs[1:].astype(np.int64) + kpos
                        kpos += nb
                    else:
                        _read_into(f, keys[pos : pos + n])
                    _read_into(f, codes[pos : pos + n])
                    pos += int(n)
        bounds[t + 1] = pos
    return StreamRows(first, keys, key_offsets, codes, bounds)


def _read_into(f: BinaryIO, arr: np.ndarray) -> None:
    view = memoryview(arr).cast("B")
    got = f.readinto(view)
    if got != len(view):
        raise OSError(f"{f.name}: spill file is truncated (read {got} of {len(view)} bytes)")
