"""Users of a unit of the words pass: dense indices, and the output order (shard, user id).

A user's shard is the top ``shard_bits`` bits of its hash, so a run split into partitions,
workers or ``--num-shards`` jobs puts the same users in the same shards; within a shard users
are in ascending id order (integers by value, strings by their UTF-8 bytes).  With one shard
the output is simply sorted by user id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from tokenizer.hashing import IntTable, StrTable, hash_int64, top_bits


@njit(cache=True, nogil=True)
def _distinct_sorted_strings(h, offsets, data, order):  # pragma: no cover - compiled
    """Positions in ``order`` that start a new (h, bytes) value."""
    n = order.shape[0]
    keep = np.zeros(n, np.bool_)
    for i in range(n):
        if i == 0:
            keep[i] = True
            continue
        a, b = order[i - 1], order[i]
        if h[a] != h[b] or offsets[a + 1] - offsets[a] != offsets[b + 1] - offsets[b]:
            keep[i] = True
            continue
        for j in range(offsets[a + 1] - offsets[a]):
            if data[offsets[a] + j] != data[offsets[b] + j]:
                keep[i] = True
                break
    return keep


@dataclass
class UserList:
    """Distinct users in output order: their hashes and ids (int64, or string offsets + bytes)."""

    h: np.ndarray  # uint64 [N]
    values: np.ndarray | None  # int64 [N]
    offsets: np.ndarray | None  # int64 [N+1]
    data: np.ndarray | None  # uint8

    def __len__(self) -> int:
        return len(self.h)

    def key(self, i: int) -> int | str:
        """User i's id as a Python value."""
        if self.values is not None:
            return int(self.values[i])
        return bytes(self.data[int(self.offsets[i]) : int(self.offsets[i + 1])]).decode("utf-8")

    def arrow(self, start: int = 0, stop: int | None = None) -> pa.Array:
        """Ids [start, stop) as an Arrow int64 or string array."""
        stop = len(self) if stop is None else stop
        if self.values is not None:
            return pa.array(self.values[start:stop], pa.int64())
        offs = self.offsets[start : stop + 1]
        data = self.data[int(offs[0]) : int(offs[-1])]
        offs = offs - offs[0]
        if offs[-1] < 2**31:
            return pa.Array.from_buffers(pa.string(), stop - start, [None, pa.py_buffer(offs.astype(np.int32)),
                                                                     pa.py_buffer(data.copy())])
        return pa.Array.from_buffers(pa.large_string(), stop - start, [None, pa.py_buffer(offs.copy()),
                                                                       pa.py_buffer(data.copy())]).cast(pa.string())

    def table(self) -> IntTable | StrTable:
        """A table giving each user its position + 1."""
        ok = np.ones(len(self), bool)
        if self.values is not None:
            t = IntTable(len(self))
            t.codes(self.values, ok)
        else:
            t = StrTable(len(self))
            t.codes_of_buffers(self.offsets, self.data if len(self.data) else np.zeros(1, np.uint8), ok)
        return t


def _take(users: UserList, order: np.ndarray) -> UserList:
    if users.values is not None:
        return UserList(users.h[order], users.values[order], None, None)
    from tokenizer.spill import take_strings

    offs, data = take_strings(users.offsets, users.data, order)
    return UserList(users.h[order], None, offs, data)


@njit(cache=True, nogil=True)
def ranks_of_codes(codes: np.ndarray, order: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """Dense index of each row's user: the position of its table entry (code - 1) in ``order``."""
    rank = np.empty(order.shape[0], np.int64)
    for i in range(order.shape[0]):
        rank[order[i]] = i
    out = np.empty(codes.shape[0], np.int64)
    for i in range(codes.shape[0]):
        out[i] = rank[codes[i] - 1]
    return out


def sort_users(users: UserList, shard_bits: int, distinct: bool = False) -> tuple[UserList, np.ndarray]:
    """Users in output order (shard, id) (and, if ``distinct``, without repeats); also the order."""
    shard = top_bits(users.h, shard_bits)
    if users.values is not None:
        order = np.lexsort((users.values, shard))
        if distinct and len(order):
            v = users.values[order]
            keep = np.ones(len(order), bool)
            keep[1:] = v[1:] != v[:-1]
            order = order[keep]
    else:
        data = users.data if len(users.data) else np.zeros(1, np.uint8)
        keys = pa.Array.from_buffers(pa.large_binary(), len(users), [None, pa.py_buffer(users.offsets),
                                                                    pa.py_buffer(data)])
        # Arrow orders binary values by their bytes, as the reference orders UTF-8 strings.
        order = pc.sort_indices(pa.table({"s": shard, "k": keys}), sort_keys=[("s", "ascending"),
                                                                             ("k", "ascending")]).to_numpy()
        if distinct and len(order):
            order = order[_distinct_sorted_strings(users.h, users.offsets, data, order)]
    return _take(users, order), order


def table_users(table: IntTable | StrTable) -> UserList:
    """The distinct users of a table, in code order."""
    if isinstance(table, IntTable):
        values = table.values().copy()
        return UserList(hash_int64(values), values, None, None)
    n = table.size
    return UserList(table.hashes().copy(), None, table._off[: n + 1].copy(), table._arena[: int(table._off[n])].copy())


def concat_users(parts: list[UserList]) -> UserList:
    if parts[0].values is not None:
        return UserList(np.concatenate([p.h for p in parts]), np.concatenate([p.values for p in parts]), None, None)
    offs, base = [np.zeros(1, np.int64)], 0
    for p in parts:
        offs.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return UserList(np.concatenate([p.h for p in parts]), None, np.concatenate(offs),
                    np.concatenate([p.data for p in parts]))


def empty_users(string_ids: bool) -> UserList:
    if string_ids:
        return UserList(np.zeros(0, np.uint64), None, np.zeros(1, np.int64), np.zeros(0, np.uint8))
    return UserList(np.zeros(0, np.uint64), np.zeros(0, np.int64), None, None)


def positions(universe_table: IntTable | StrTable, users: UserList) -> np.ndarray:
    """int64 position of each of ``users`` in the universe the table was built from."""
    ok = np.ones(len(users), bool)
    if users.values is not None:
        codes = universe_table.codes(users.values, ok, insert=False)
    else:
        data = users.data if len(users.data) else np.zeros(1, np.uint8)
        codes = universe_table.codes_of_buffers(users.offsets, data, ok, insert=False)
    if len(codes) and codes.min() < 1:
        raise AssertionError("a user is missing from the unit's universe")
    return codes.astype(np.int64) - 1
