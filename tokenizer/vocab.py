"""Vocabularies: per-attribute value counts, cutoffs, ids, and encoding values to ids.

Ids follow docs/FORMATS.md §3: 0 = padding, 1 = unknown (null, below ``min_count`` or past
``max_vocab``), then known values from 2 in descending count order, ties by ascending value.
The order is a pure function of the counts, so two runs over the same data (in any file or
batch order) give the same ids.

Counting is streaming: each batch is counted by Arrow's hash kernels (``value_counts``; a
dictionary-encoded batch by ``bincount`` over its indices), and the partial counts are merged
with a group-by whenever they grow, so memory follows the number of distinct values, not rows.

Derived attribute values are computed here too, so that the vocabulary pass and the encoding
pass cannot disagree on them:

- ``@hour``: local hour of day 0..23; ``@weekday``: local day of week, Monday = 0.
- ``buckets = [b0, b1, ...]``: bucket index ``np.searchsorted(b, x, side="right")``, i.e.
  ``x < b0 -> 0``, ``b0 <= x < b1 -> 1``, ..., ``x >= b[-1] -> len(b)``; null/NaN stay null.
  The vocabulary of a bucketed attribute holds these bucket indices (int64), not raw values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from tokenizer.io import InputError, plain
from tokenizer.schema import FIRST_ID, UNK_ID, AttributeSpec, UserAttributeSpec
from tokenizer.shards import atomic_write_table

_COMPACT_ROWS = 1 << 20  # merge partial counts once this many (value, count) pairs are pending
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


# -- derived values ---------------------------------------------------------------------------
def attribute_values(
    spec: AttributeSpec | UserAttributeSpec,
    column: pa.Array | None,
    local_s: np.ndarray | None = None,
    where: str = "",
) -> pa.Array:
    """The values an attribute is counted and encoded on (raw column, derived time, or bucket)."""
    if spec.column == "@hour":
        return pa.array(np.floor_divide(local_s, 3600) % 24)
    if spec.column == "@weekday":
        return pa.array((np.floor_divide(local_s, 86400) + _EPOCH_WEEKDAY) % 7)
    if spec.buckets is None:
        # Dictionary-encoded columns stay encoded: counting and encoding then work per
        # distinct value (see ValueCounter.update and Vocab.encode).
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        return column if pa.types.is_dictionary(column.type) else plain(column)
    return bucketize(plain(column), spec.buckets, where)


def bucketize(arr: pa.Array, buckets: list[float], where: str = "") -> pa.Array:
    """Bucket index of each numeric value, searchsorted side='right' (see the module doc)."""
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_null(arr.type)):
        raise InputError(f"{where}: bucketed column must be numeric, got {arr.type}")
    x = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    idx = np.searchsorted(np.asarray(buckets, dtype=np.float64), x, side="right").astype(np.int64)
    missing = np.isnan(x)
    return pa.array(idx, mask=missing if missing.any() else None)


# -- counting ---------------------------------------------------------------------------------
class ValueCounter:
    """Exact value counts of one attribute, merged across batches; nulls are not counted."""

    def __init__(self, where: str = "") -> None:
        self.where = where
        self._values: list[pa.Array] = []
        self._counts: list[np.ndarray] = []
        self._pending = 0
        self.type: pa.DataType | None = None

    def update(self, arr: pa.Array) -> None:
        if len(arr) == 0:
            return
        if pa.types.is_dictionary(arr.type):
            idx = arr.indices.drop_null().to_numpy()
            counts = np.bincount(idx, minlength=len(arr.dictionary)).astype(np.int64)
            keep = np.flatnonzero(counts)
            values, counts = plain(arr.dictionary.take(pa.array(keep))), counts[keep]
        else:
            arr = plain(arr)
            if pa.types.is_null(arr.type):
                return
            vc = pc.value_counts(arr)
            values, counts = vc.field("values"), vc.field("counts").to_numpy()
            if values.null_count:
                ok = values.is_valid()
                values, counts = values.filter(ok), counts[ok.to_numpy(zero_copy_only=False)]
        self._check_type(values.type)
        self._values.append(values)
        self._counts.append(counts)
        self._pending += len(values)
        if self._pending > _COMPACT_ROWS and len(self._values) > 1:
            self._compact()

    def _check_type(self, t: pa.DataType) -> None:
        if pa.types.is_null(t):
            return
        if self.type is None:
            self.type = t
        elif t != self.type:
            raise InputError(
                f"{self.where}: column type changes between files or batches ({self.type} vs {t})"
            )

    def _compact(self) -> None:
        vals = [v for v in self._values if not pa.types.is_null(v.type)]
        table = pa.table({"value": pa.concat_arrays(vals), "count": np.concatenate(self._counts)})
        merged = table.group_by("value", use_threads=False).aggregate([("count", "sum")])
        self._values = [merged.column("value").combine_chunks()]
        self._counts = [merged.column("count_sum").to_numpy()]
        self._pending = len(self._counts[0])

    def result(self, default_type: pa.DataType | None = None) -> tuple[pa.Array, np.ndarray]:
        """(distinct values, int64 counts), in no particular order."""
        if not self._values:
            return pa.array([], type=self.type or default_type or pa.string()), np.zeros(0, np.int64)
        if len(self._values) > 1:
            self._compact()
        return self._values[0], self._counts[0].astype(np.int64, copy=False)


# -- the vocabulary ---------------------------------------------------------------------------
@dataclass
class Vocab:
    """Known values of one attribute; ``values[i]`` has id ``i + 2``."""

    values: pa.Array
    counts: np.ndarray  # int64, same length as values, descending

    @property
    def size(self) -> int:
        """Number of ids including padding and unknown (the embedding table's row count)."""
        return len(self.values) + FIRST_ID

    @classmethod
    def from_counts(
        cls, values: pa.Array, counts: np.ndarray, min_count: int = 1, max_vocab: int | None = None
    ) -> Vocab:
        """Apply the cutoffs and order by (count descending, value ascending)."""
        table = pa.table({"value": values, "count": pa.array(counts, pa.int64())})
        if min_count > 1:
            table = table.filter(pc.greater_equal(table.column("count"), min_count))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        if max_vocab is not None:
            table = table.slice(0, max(0, max_vocab - FIRST_ID))
        return cls(table.column("value").combine_chunks(), table.column("count").to_numpy())

    def encode(self, arr: pa.Array) -> np.ndarray:
        """int32 ids of ``arr``'s values: known -> 2.., null or unseen -> 1 (never 0)."""
        if pa.types.is_dictionary(arr.type):
            # Encode the (small) dictionary once and gather by index: one hash lookup per
            # distinct value instead of per row.
            dict_ids = np.append(self.encode(arr.dictionary), np.int32(UNK_ID))
            idx = arr.indices.fill_null(len(arr.dictionary)).to_numpy(zero_copy_only=False)
            return dict_ids[idx]
        arr = plain(arr)
        if len(self.values) == 0 or pa.types.is_null(arr.type):
            return np.full(len(arr), UNK_ID, dtype=np.int32)
        if arr.type != self.values.type:
            try:
                arr = arr.cast(self.values.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InputError(
                    f"values of type {arr.type} cannot be looked up in a vocabulary of {self.values.type}"
                ) from None
        pos = pc.index_in(arr, value_set=self.values)
        ids = pc.add(pos.fill_null(UNK_ID - FIRST_ID), pa.scalar(FIRST_ID, pos.type))
        return ids.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)

    def decode(self, ids: np.ndarray) -> pa.Array:
        """Values of ids (padding and unknown decode to null)."""
        ids = np.asarray(ids, dtype=np.int64)
        known = ids >= FIRST_ID
        take = pa.array(np.where(known, ids - FIRST_ID, 0), mask=~known)
        return self.values.take(take)

    def save(self, path: str | Path) -> None:
        atomic_write_table(path, pa.table({"value": self.values, "count": pa.array(self.counts, pa.int64())}))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocabulary file not found")
        table = ipc.open_file(str(path)).read_all()
        if table.column_names[:2] != ["value", "count"]:
            raise InputError(f"{path}: not a vocabulary file (expected columns value, count)")
        return cls(table.column("value").combine_chunks(), table.column("count").to_numpy())


def vocab_file(root: str | Path, segment: str, attribute: str) -> Path:
    """Where a vocabulary lives: ``<root>/<segment>.<attribute>.arrow`` ("user" for user attributes)."""
    return Path(root) / f"{segment}.{attribute}.arrow"
