"""Attribute coding: raw values -> per-task codes -> global codes -> vocabulary ids.

The reading pass decodes each input once.  It cannot write vocabulary ids yet (they depend on
counts over the whole input), so each task gives every distinct value it meets a *task code*
(1.., in order of first sight; 0 = null) and counts codes over good rows.  After the pass:

- the tasks' values are merged, in task order, into *global codes* (one per distinct value),
  giving each task a lookup table task code -> global code, and the counts are summed;
- the vocabulary (FORMATS.md §3) is built from the global counts, giving a lookup table
  global code -> id (1 = unknown for values below min_count or past max_vocab, and for null).

The words pass applies the first table to the spilled codes (duplicate events are compared on
global codes) and the second when it gathers the kept actions.

Kinds of attributes:

- ``str``: strings or binary (dictionary-encoded or plain); values must be valid UTF-8
- ``int``: integers (and booleans as 0/1)
- ``float``: floats used as categories (-0.0 is 0.0; NaN is null)
- ``fixed``: bucketed numbers (bucket 0..len(buckets)) and derived @hour/@weekday: the value is
  the code minus one, no table needed

With ``--vocab``, every task's table starts with the given vocabulary's values, in id order,
so known values have the same codes everywhere; new values are still coded (duplicates are
compared on them) and map to unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from tokenizer.hashing import IntTable, StrTable, string_buffers, utf8_invalid
from tokenizer.io import InputError
from tokenizer.plan import KIND_FIXED, KIND_FLOAT, KIND_INT, KIND_STR, AttrPlan
from tokenizer.schema import FIRST_ID, UNK_ID
from tokenizer.vocab import Vocab

_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


class IntRangeError(ValueError):
    """An unsigned 64-bit value above int64's range, at ``row`` of the batch column."""

    def __init__(self, row: int, value: int, column: str | None = None) -> None:
        super().__init__(row, value)
        self.row, self.value, self.column = row, value, column

    def located(self, path: object, first_row: int) -> InputError:
        """The error a user sees: file, row and column, and what to do."""
        return InputError(f"{path}: row {first_row + self.row} (0-based): column {self.column!r} holds {self.value}, "
                          "beyond the int64 range integer ids and values are kept in; store the column as strings "
                          "(or as int64)")


def as_int64(arr: pa.Array) -> pa.Array:
    """An integer (or boolean) column as int64; uint64 values past 2**63 - 1 raise :class:`IntRangeError`."""
    if arr.type == pa.int64():
        return arr
    if arr.type == pa.uint64():
        big = pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64())).fill_null(False)
        if pc.any(big).as_py():
            row = int(pc.index(big, True).as_py())
            raise IntRangeError(row, arr[row].as_py())
    return arr.cast(pa.int64())


def valid_of(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


def float_keys(f: np.ndarray) -> np.ndarray:
    """int64 bit patterns of float64 values, with -0.0 folded into 0.0."""
    f = np.where(f == 0.0, 0.0, f).astype(np.float64)
    return f.view(np.int64)


@njit(cache=True, nogil=True)
def bucket_codes(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """int32 code of each value: 0 for NaN (null), else 1 + the number of boundaries <= x
    (``searchsorted(bounds, x, side="right")``: x < b0 -> bucket 0, x >= b[-1] -> len(b))."""
    out = np.empty(x.shape[0], np.int32)
    m = bounds.shape[0]
    for i in range(x.shape[0]):
        v = x[i]
        if v != v:
            out[i] = 0
            continue
        lo, hi = 0, m
        while lo < hi:
            mid = (lo + hi) // 2
            if bounds[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo + 1
    return out


@njit(cache=True, nogil=True)
def _count(codes: np.ndarray, column: int, good: np.ndarray, counts: np.ndarray) -> None:  # pragma: no cover
    for i in range(codes.shape[0]):
        if good[i]:
            counts[codes[i, column]] += 1


class Coder:
    """Task codes of one attribute: ``encode`` a batch column, ``values`` in code order."""

    def __init__(self, attr: AttrPlan, seed: Vocab | None = None, table: IntTable | StrTable | None = None) -> None:
        """``table``: a value table shared with coders of the same column (of other segments)."""
        self.attr = attr
        self.table: IntTable | StrTable | None = table
        if table is None and attr.kind == KIND_STR:
            self.table = StrTable()
        elif table is None and attr.kind in (KIND_INT, KIND_FLOAT):
            self.table = IntTable()
        self.counts = np.zeros(max(attr.domain + 1, 1024), np.int64)
        self._bounds = np.asarray(attr.buckets if attr.buckets is not None else [], np.float64)
        self._dict_cache: tuple | None = None
        if seed is not None and self.table is not None and len(seed.values):
            self._seed(seed.values)

    def _seed(self, values: pa.Array) -> None:
        ok = np.ones(len(values), bool)
        if self.attr.kind == KIND_STR:
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                raise InputError(f"attribute {self.attr.name}: the given vocabulary holds {values.type}, "
                                 "the input strings")
            self.table.codes(values, ok)
        elif self.attr.kind == KIND_FLOAT:
            self.table.codes(float_keys(values.cast(pa.float64()).to_numpy()), ok)
        else:
            if not pa.types.is_integer(values.type):
                raise InputError(f"attribute {self.attr.name}: the given vocabulary holds {values.type}, "
                                 "the input integers")
            self.table.codes(values.cast(pa.int64()).to_numpy(), ok)

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, column: pa.Array | None, t_local: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(int32 codes [n], bool invalid-UTF-8 mask or None) of a batch column."""
        a = self.attr
        if a.derived == "@hour":
            return (np.floor_divide(t_local, 3600) % 24 + 1).astype(np.int32), None
        if a.derived == "@weekday":
            return ((np.floor_divide(t_local, 86400) + _EPOCH_WEEKDAY) % 7 + 1).astype(np.int32), None
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if a.kind == KIND_FIXED:
            return self._buckets(column), None
        try:
            if pa.types.is_dictionary(column.type):
                return self._encode_dictionary(column)
            return self._encode_plain(column)
        except IntRangeError as e:
            e.column = a.column
            raise

    def _buckets(self, column: pa.Array) -> np.ndarray:
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        if pa.types.is_null(column.type):
            return np.zeros(len(column), np.int32)
        x = column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        return bucket_codes(x, self._bounds)

    def _encode_plain(self, column: pa.Array, distinct: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes of a plain (not dictionary-encoded) column; ``distinct``: its values are known to be
        distinct (a dictionary), so dictionary-encoding it first would gain nothing."""
        valid = valid_of(column)
        t = column.type
        if pa.types.is_null(t):
            return np.zeros(len(column), np.int32), None
        if self.attr.kind == KIND_STR:
            if len(column) > 4096 and not distinct:
                # Plain strings (CSV): Arrow's hash kernel dictionary-encodes them, and only the
                # distinct values are checked and coded (once: the dictionary is coded as it is).
                return self._encode_dictionary(pc.dictionary_encode(column))
            offsets, data = string_buffers(column)
            bad = utf8_invalid(offsets, data)
            bad &= valid
            return self.table.codes_of_buffers(offsets, data, valid & ~bad), (bad if bad.any() else None)
        if self.attr.kind == KIND_FLOAT:
            f = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
            nan = np.isnan(f)
            return self.table.codes(float_keys(np.where(nan, 0.0, f)), valid & ~nan), None
        column = as_int64(column)
        buf = column.buffers()[1]
        values = np.frombuffer(buf, np.int64, count=len(column), offset=column.offset * 8)
        return self.table.codes(values, valid), None

    def _encode_dictionary(self, column: pa.DictionaryArray) -> tuple[np.ndarray, np.ndarray | None]:
        d = column.dictionary
        bufs = d.buffers()
        key = (len(d), d.offset, tuple(b.address if b is not None else 0 for b in bufs))
        if self._dict_cache is not None and self._dict_cache[0] == key:
            dict_codes, dict_bad = self._dict_cache[1], self._dict_cache[2]
        else:
            codes, bad = self._encode_plain(d, distinct=True)
            # One extra slot for null indices: code 0 and not bad.
            dict_codes = np.append(codes, np.int32(0))
            dict_bad = np.append(bad if bad is not None else np.zeros(len(d), bool), False)
            self._dict_cache = (key, dict_codes, dict_bad, d)  # keep d alive: its address is the key
        idx = column.indices
        if idx.null_count:
            idx = idx.fill_null(len(d))
        idx = idx.to_numpy(zero_copy_only=False)
        bad = dict_bad[idx] if dict_bad.any() else None
        return dict_codes[idx], bad

    # -- counting --------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of task codes in use, null included (codes 0..size-1)."""
        return (self.table.size if self.table is not None else self.attr.domain) + 1

    def count(self, codes: np.ndarray, column: int, good: np.ndarray) -> None:
        """Add the codes in ``codes[:, column]`` of the good rows to the counts."""
        if self.size > len(self.counts):
            grown = np.zeros(max(self.size, 2 * len(self.counts)), np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        _count(codes, column, good, self.counts)

    def state(self) -> dict[str, np.ndarray]:
        """What the merge needs: counts and the values in code order (as arrays)."""
        out = {"counts": self.counts[: self.size].copy()}
        if isinstance(self.table, StrTable):
            n = self.table.size
            out["offsets"] = self.table._off[: n + 1].copy()
            out["data"] = self.table._arena[: int(self.table._off[n])].copy()
        elif isinstance(self.table, IntTable):
            out["values"] = self.table.values().copy()
        return out


# -- merging tasks and building vocabularies --------------------------------------------------------
@dataclass
class GlobalCodes:
    """One attribute's values over the whole input: global codes, counts, and per-task tables."""

    attr: AttrPlan
    values: pa.Array  # value of global code c at index c-1
    counts: np.ndarray  # int64 [G+1], index = global code (0 = null)
    task_luts: list[np.ndarray]  # per task: int32 task code -> global code

    @property
    def size(self) -> int:
        return len(self.counts)


def merge_codes(attr: AttrPlan, states: list[dict[str, np.ndarray]], seed: Vocab | None = None) -> GlobalCodes:
    """Merge the tasks' codes of one attribute, in task order (see the module doc)."""
    coder = Coder(attr, seed)
    luts = []
    for st in states:
        n = len(st["counts"])
        if coder.table is None:
            lut = np.arange(n, dtype=np.int32)
        elif isinstance(coder.table, StrTable):
            offsets, data = st["offsets"], st["data"]
            if len(data) == 0:
                data = np.zeros(1, np.uint8)
            lut = np.append(np.int32(0), coder.table.codes_of_buffers(offsets, data, np.ones(n - 1, bool)))
        else:
            lut = np.append(np.int32(0), coder.table.codes(st["values"], np.ones(n - 1, bool)))
        luts.append(lut.astype(np.int32))
    size = coder.size
    counts = np.zeros(size, np.int64)
    for st, lut in zip(states, luts):
        counts[lut] += st["counts"]  # a task's codes map to distinct global codes: no repeats in lut
    if isinstance(coder.table, StrTable):
        values = coder.table.arrow_values()
        if values.type != pa.string():
            values = values.cast(pa.string())
    elif isinstance(coder.table, IntTable):
        raw = coder.table.values().copy()
        values = pa.array(raw.view(np.float64) if attr.kind == KIND_FLOAT else raw)
    else:
        values = pa.array(np.arange(attr.domain, dtype=np.int64))
    return GlobalCodes(attr, values, counts, luts)


def build_vocab(g: GlobalCodes) -> tuple[Vocab, np.ndarray]:
    """The vocabulary of FORMATS.md §3 from global counts, and the table global code -> id."""
    counts = g.counts[1:]
    seen = np.flatnonzero(counts)  # values of bad rows only were coded but never counted
    rows = seen[Vocab.ranked(g.values.take(pa.array(seen)), counts[seen], max(1, g.attr.min_count), g.attr.max_vocab)]
    ids = np.full(g.size, UNK_ID, np.int32)
    ids[rows + 1] = np.arange(FIRST_ID, FIRST_ID + len(rows), dtype=np.int32)
    return Vocab(g.values.take(pa.array(rows)), counts[rows]), ids


def ids_for_vocab(g: GlobalCodes, vocab: Vocab) -> np.ndarray:
    """The table global code -> id for a given (loaded) vocabulary; unseen values -> unknown."""
    ids = np.full(g.size, UNK_ID, np.int32)
    if len(vocab.values) and len(g.values):
        values = g.values
        if values.type != vocab.values.type:
            try:
                values = values.cast(vocab.values.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(f"attribute {g.attr.name}: values of type {values.type} cannot be looked up in "
                                 f"a vocabulary of {vocab.values.type}") from None
        pos = pc.index_in(values, value_set=vocab.values).fill_null(-1).to_numpy(zero_copy_only=False)
        known = pos >= 0
        ids[1:][known] = (pos[known] + FIRST_ID).astype(np.int32)
    return ids
