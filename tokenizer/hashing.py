"""Hashing of ids and values (Numba): user hashes, the partition and shard of a user, a
HyperLogLog sketch of the number of users, and growable hash tables that give int64 and
string values dense codes.

The user hash fixes where a user goes, so it is part of the output format (FORMATS.md §4):

- int64 ids: ``fmix64(uint64(id))``
- string ids: FNV-1a 64 over the UTF-8 bytes, then ``fmix64``

``fmix64`` is MurmurHash3's finaliser; it spreads every input bit over the top bits, which
pick the shard (``shard = h >> (64 - log2 S)``) and the spill partition the same way.

The tables replace Arrow's hash kernels on the hot path: a batch of values is looked up (and
new values appended) in one compiled loop, and the dense codes (1.. in order of first sight;
0 is null) are what the spill files carry.  Values are kept in first-sight order so that a
code can be turned back into its value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from numba import njit

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_S33 = np.uint64(33)
HLL_BITS = 14  # 16,384 registers: ~0.8% standard error on the distinct-user estimate


@njit(inline="always")
def fmix64(x):  # pragma: no cover - compiled
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@njit(inline="always")
def _bytes_hash(data, start, end):  # pragma: no cover - compiled
    h = _FNV_OFFSET
    for j in range(start, end):
        h ^= np.uint64(data[j])
        h *= _FNV_PRIME
    return fmix64(h)


@njit(cache=True, nogil=True)
def hash_int64(values: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    out = np.empty(values.shape[0], np.uint64)
    for i in range(values.shape[0]):
        out[i] = fmix64(np.uint64(values[i]))
    return out


@njit(cache=True, nogil=True)
def hash_strings(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    n = offsets.shape[0] - 1
    out = np.empty(n, np.uint64)
    for i in range(n):
        out[i] = _bytes_hash(data, offsets[i], offsets[i + 1])
    return out


def hash_ids(arr: pa.Array) -> np.ndarray:
    """uint64 user hash of each entry of an int64 or string array (null entries: garbage)."""
    if pa.types.is_integer(arr.type):
        return hash_int64(int_values(arr))
    offsets, data = string_buffers(arr)
    return hash_strings(offsets, data)


# -- zero-copy views of Arrow buffers -----------------------------------------------------------
def int_values(arr: pa.Array) -> np.ndarray:
    """int64 numpy view of an int64 array's values (null slots hold arbitrary values)."""
    if arr.type != pa.int64():
        arr = arr.cast(pa.int64())
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(len(arr), np.int64)
    return np.frombuffer(buf, np.int64, count=len(arr), offset=arr.offset * 8)


def string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a string/binary array: offsets int32 or int64 [n+1], data uint8."""
    t = arr.type
    if pa.types.is_string_view(t) or pa.types.is_binary_view(t):
        arr = arr.cast(pa.large_binary())
        t = arr.type
    wide = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
    bufs = arr.buffers()
    odt = np.int64 if wide else np.int32
    offsets = np.frombuffer(bufs[1], odt, count=len(arr) + 1, offset=arr.offset * odt().itemsize) if bufs[1] else (
        np.zeros(len(arr) + 1, odt))
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    return offsets, data


# -- partitions, shards and the user-count sketch ------------------------------------------------
@njit(cache=True, nogil=True)
def top_bits(h: np.ndarray, bits: int) -> np.ndarray:  # pragma: no cover - compiled
    """int64 ``h >> (64 - bits)``: the partition (or shard) of each hash, 0 for bits == 0."""
    out = np.zeros(h.shape[0], np.int64)
    if bits > 0:
        shift = np.uint64(64 - bits)
        for i in range(h.shape[0]):
            out[i] = np.int64(h[i] >> shift)
    return out


@njit(cache=True, nogil=True)
def hll_update(registers: np.ndarray, h: np.ndarray, valid: np.ndarray) -> None:  # pragma: no cover
    """Add hashes to a HyperLogLog sketch (registers: uint8 [2**HLL_BITS]); order-independent."""
    p = np.uint64(HLL_BITS)
    rest_bits = 64 - HLL_BITS
    for i in range(h.shape[0]):
        if not valid[i]:
            continue
        x = h[i]
        idx = np.int64(x >> np.uint64(64 - HLL_BITS))
        w = (x << p) | (np.uint64(1) << np.uint64(HLL_BITS - 1))  # the guard bit bounds the rank
        rank = 1
        while rank <= rest_bits and (w & np.uint64(0x8000000000000000)) == 0:
            w <<= np.uint64(1)
            rank += 1
        if rank > registers[idx]:
            registers[idx] = rank


def hll_estimate(registers: np.ndarray) -> float:
    """The HyperLogLog cardinality estimate, with linear counting for small sets."""
    m = float(len(registers))
    alpha = 0.7213 / (1.0 + 1.079 / m)
    raw = alpha * m * m / float(np.sum(np.ldexp(1.0, -registers.astype(np.int64))))
    zeros = int(np.count_nonzero(registers == 0))
    if raw <= 2.5 * m and zeros:
        return m * float(np.log(m / zeros))
    return raw


# -- growable hash tables ------------------------------------------------------------------------
_BLOCK = 32  # keys looked up together: their table reads are issued before any is used (see _touch_block)


@njit(cache=True, nogil=True)
def _int_lookup(slots, values, size, arr, valid, out, start, insert):  # pragma: no cover - compiled
    """Codes of arr[start:] (0 for invalid; -1 when absent and not inserting).

    Stops early, returning (size, i), when the table reaches half full or ``values`` is full:
    the caller grows it and calls again from row i.  Returns (size, n) when done.
    """
    mask = np.uint64(slots.shape[0] - 1)
    limit = min(slots.shape[0] // 2, values.shape[0])
    touched = np.zeros(1, np.int64)  # keeps the block reads (see _touch_block)
    for i in range(start, arr.shape[0]):
        if (i - start) % _BLOCK == 0:  # read the block's first slots and entries before using any
            acc = np.int64(0)
            for j in range(i, min(i + _BLOCK, arr.shape[0])):
                e = slots[fmix64(np.uint64(arr[j])) & mask]
                if e >= 0:
                    acc ^= values[e]
            touched[0] ^= acc
        if not valid[i]:
            out[i] = 0
            continue
        v = arr[i]
        pos = fmix64(np.uint64(v)) & mask
        while True:
            e = slots[pos]
            if e < 0:
                if insert:
                    if size >= limit:
                        return size, i
                    slots[pos] = size
                    values[size] = v
                    size += 1
                    out[i] = size  # code = entry + 1
                else:
                    out[i] = -1
                break
            if values[e] == v:
                out[i] = e + 1
                break
            pos = (pos + np.uint64(1)) & mask
    return size, arr.shape[0]


@njit(cache=True, nogil=True)
def _int_rehash(values, size, slots):  # pragma: no cover - compiled
    mask = np.uint64(slots.shape[0] - 1)
    for e in range(size):
        pos = fmix64(np.uint64(values[e])) & mask
        while slots[pos] >= 0:
            pos = (pos + np.uint64(1)) & mask
        slots[pos] = e


@njit(cache=True, nogil=True)
def _touch_block(ent_hash, ent_off, arena, slots, offsets, data, valid, hashes, a, b, mask):  # pragma: no cover
    """Hash keys a..b-1 and read the table lines their lookups will need (first slot, the entry's
    hash and offset, the start of its bytes).  The reads do not depend on one another, so the CPU
    overlaps their cache misses; the exact lookup that follows then finds them in cache.  On a
    table larger than the cache this is most of a lookup's time (one miss after another)."""
    acc = np.uint64(0)
    for i in range(a, b):
        hashes[i - a] = _bytes_hash(data, offsets[i], offsets[i + 1]) if valid[i] else np.uint64(0)
    for i in range(a, b):
        e = slots[hashes[i - a] & mask]
        if e >= 0:
            acc ^= ent_hash[e] ^ np.uint64(ent_off[e])
    for i in range(a, b):
        e = slots[hashes[i - a] & mask]
        if e >= 0:
            acc ^= np.uint64(arena[ent_off[e]])
    return acc


@njit(cache=True, nogil=True)
def _str_lookup(ent_hash, ent_off, arena, slots, size, offsets, data, valid, out, start, insert):  # pragma: no cover
    """Like _int_lookup for strings; also stops when the entry arrays or the arena are full."""
    mask = np.uint64(slots.shape[0] - 1)
    limit = min(slots.shape[0] // 2, ent_hash.shape[0])
    used = ent_off[size]
    n_keys = offsets.shape[0] - 1
    hashes = np.empty(_BLOCK + 1, np.uint64)  # the last slot keeps the touched values (so they are read)
    block_start = block_end = start
    for i in range(start, n_keys):
        if i == block_end:
            block_start, block_end = i, min(i + _BLOCK, n_keys)
            hashes[_BLOCK] ^= _touch_block(ent_hash, ent_off, arena, slots, offsets, data, valid, hashes,
                                           block_start, block_end, mask)
        if not valid[i]:
            out[i] = 0
            continue
        s, e_ = offsets[i], offsets[i + 1]
        n = e_ - s
        h = hashes[i - block_start]
        pos = h & mask
        while True:
            e = slots[pos]
            if e < 0:
                if insert:
                    if size >= limit or used + n > arena.shape[0]:
                        return size, i
                    slots[pos] = size
                    ent_hash[size] = h
                    for j in range(n):
                        arena[used + j] = data[s + j]
                    used += n
                    size += 1
                    ent_off[size] = used
                    out[i] = size
                else:
                    out[i] = -1
                break
            if ent_hash[e] == h and ent_off[e + 1] - ent_off[e] == n:
                same = True
                base = ent_off[e]
                for j in range(n):
                    if arena[base + j] != data[s + j]:
                        same = False
                        break
                if same:
                    out[i] = e + 1
                    break
            pos = (pos + np.uint64(1)) & mask
    return size, offsets.shape[0] - 1


@njit(cache=True, nogil=True)
def _str_rehash(ent_hash, size, slots):  # pragma: no cover - compiled
    mask = np.uint64(slots.shape[0] - 1)
    for e in range(size):
        pos = ent_hash[e] & mask
        while slots[pos] >= 0:
            pos = (pos + np.uint64(1)) & mask
        slots[pos] = e


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, int(n - 1).bit_length())


class IntTable:
    """int64 value -> code 1.. (first-sight order); codes index ``values()`` minus one.

    Open addressing with linear probing, kept at most half full; it grows (doubling) only when
    new values arrive, so a table of a few thousand values stays in cache whatever the batch size.
    """

    kind = "int"

    def __init__(self, capacity: int = 1024) -> None:
        self._slots = np.full(_pow2_at_least(2 * capacity), -1, np.int32)
        self._values = np.empty(capacity, np.int64)
        self.size = 0

    def _grow(self) -> None:
        if self.size >= len(self._values):
            grown = np.empty(2 * len(self._values), np.int64)
            grown[: self.size] = self._values[: self.size]
            self._values = grown
        if 2 * self.size >= len(self._slots):
            self._slots = np.full(2 * len(self._slots), -1, np.int32)
            _int_rehash(self._values, self.size, self._slots)

    def codes(self, values: np.ndarray, valid: np.ndarray, insert: bool = True) -> np.ndarray:
        """int32 code of each value (0 where not valid; -1 where absent when insert=False)."""
        values = np.ascontiguousarray(values, dtype=np.int64)
        out = np.empty(len(values), np.int32)
        i = 0
        while True:
            size, i = _int_lookup(self._slots, self._values, self.size, values, valid, out, i, insert)
            self.size = int(size)
            if i >= len(values):
                return out
            self._grow()

    def values(self) -> np.ndarray:
        return self._values[: self.size]

    def arrow_values(self) -> pa.Array:
        return pa.array(self.values().copy(), pa.int64())

    @property
    def nbytes(self) -> int:
        return self._slots.nbytes + self._values.nbytes


class StrTable:
    """string (bytes) value -> code 1.. (first-sight order); bytes kept in one arena."""

    kind = "str"

    def __init__(self, capacity: int = 1024) -> None:
        self._slots = np.full(_pow2_at_least(2 * capacity), -1, np.int32)
        self._hash = np.empty(capacity, np.uint64)
        self._off = np.zeros(capacity + 1, np.int64)
        self._arena = np.empty(max(64, capacity * 16), np.uint8)
        self.size = 0

    def _grow(self, need_bytes: int) -> None:
        if self.size >= len(self._hash):
            cap = 2 * len(self._hash)
            h, off = np.empty(cap, np.uint64), np.zeros(cap + 1, np.int64)
            h[: self.size] = self._hash[: self.size]
            off[: self.size + 1] = self._off[: self.size + 1]
            self._hash, self._off = h, off
        used = int(self._off[self.size])
        if used + need_bytes > len(self._arena):
            arena = np.empty(max(used + need_bytes, 2 * len(self._arena)), np.uint8)
            arena[:used] = self._arena[:used]
            self._arena = arena
        if 2 * self.size >= len(self._slots):
            self._slots = np.full(2 * len(self._slots), -1, np.int32)
            _str_rehash(self._hash, self.size, self._slots)

    def codes_of_buffers(
        self, offsets: np.ndarray, data: np.ndarray, valid: np.ndarray, insert: bool = True
    ) -> np.ndarray:
        n = len(offsets) - 1
        out = np.empty(n, np.int32)
        i = 0
        while True:
            size, i = _str_lookup(self._hash, self._off, self._arena, self._slots, self.size, offsets, data, valid,
                                  out, i, insert)
            self.size = int(size)
            if i >= n:
                return out
            self._grow(int(offsets[i + 1] - offsets[i]))

    def codes(self, arr: pa.Array, valid: np.ndarray, insert: bool = True) -> np.ndarray:
        offsets, data = string_buffers(arr)
        return self.codes_of_buffers(offsets, data, valid, insert)

    def arrow_values(self) -> pa.Array:
        """The values in code order as an Arrow string array (a copy of the arena)."""
        n = self.size
        offsets = self._off[: n + 1]
        data = self._arena[: int(offsets[-1])].copy()
        if offsets[-1] < 2**31:
            return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.astype(np.int32)),
                                                          pa.py_buffer(data)])
        return pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets.copy()), pa.py_buffer(data)])

    def hashes(self) -> np.ndarray:
        return self._hash[: self.size]

    @property
    def nbytes(self) -> int:
        return self._slots.nbytes + self._hash.nbytes + self._off.nbytes + self._arena.nbytes


# -- UTF-8 validation ----------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def utf8_invalid(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """bool per string: its bytes are not well-formed UTF-8 (overlongs and surrogates included)."""
    n = offsets.shape[0] - 1
    out = np.zeros(n, np.bool_)
    for i in range(n):
        j, e = offsets[i], offsets[i + 1]
        while j < e:
            c = data[j]
            if c < 0x80:
                j += 1
                continue
            if 0xC2 <= c <= 0xDF:
                need, lo, hi = 1, 0x80, 0xBF
            elif c == 0xE0:
                need, lo, hi = 2, 0xA0, 0xBF
            elif 0xE1 <= c <= 0xEC or 0xEE <= c <= 0xEF:
                need, lo, hi = 2, 0x80, 0xBF
            elif c == 0xED:
                need, lo, hi = 2, 0x80, 0x9F
            elif c == 0xF0:
                need, lo, hi = 3, 0x90, 0xBF
            elif 0xF1 <= c <= 0xF3:
                need, lo, hi = 3, 0x80, 0xBF
            elif c == 0xF4:
                need, lo, hi = 3, 0x80, 0x8F
            else:
                out[i] = True
                break
            if j + need >= e:  # the sequence runs past the end of the string
                out[i] = True
                break
            b = data[j + 1]
            if b < lo or b > hi:
                out[i] = True
                break
            ok = True
            for k in range(2, need + 1):
                b = data[j + k]
                if b < 0x80 or b > 0xBF:
                    ok = False
                    break
            if not ok:
                out[i] = True
                break
            j += need + 1
    return out
