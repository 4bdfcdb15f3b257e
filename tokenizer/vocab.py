"""Vocabularies: ids from counts, encoding values to ids and back, and the vocabulary files.

Ids follow docs/FORMATS.md §3: 0 = padding, 1 = unknown (null, below ``min_count`` or past
``max_vocab``), then known values from 2 in descending count order, ties by ascending value.
The order is a pure function of the counts, so two runs over the same data (in any file or
batch order) give the same ids.  Counting happens while reading (tokenizer/coders.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from common.atomic import arrow_file, atomic_write
from tokenizer.io import InputError, plain
from tokenizer.schema import FIRST_ID, UNK_ID


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

    @staticmethod
    def ranked(values: pa.Array, counts: np.ndarray, min_count: int = 1, max_vocab: int | None = None) -> np.ndarray:
        """Indices of the values that get ids, in id order: counts >= min_count, by (count
        descending, value ascending), the first max_vocab - 2."""
        table = pa.table({"value": values, "count": pa.array(counts, pa.int64()),
                          "row": pa.array(np.arange(len(values), dtype=np.int64))})
        if min_count > 1:
            table = table.filter(pc.greater_equal(table.column("count"), min_count))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        if max_vocab is not None:
            table = table.slice(0, max(0, max_vocab - FIRST_ID))
        return table.column("row").to_numpy()

    @classmethod
    def from_counts(
        cls, values: pa.Array, counts: np.ndarray, min_count: int = 1, max_vocab: int | None = None
    ) -> Vocab:
        """Apply the cutoffs and order by (count descending, value ascending)."""
        rows = cls.ranked(values, counts, min_count, max_vocab)
        return cls(values.take(pa.array(rows)), np.asarray(counts, np.int64)[rows])

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

    def table(self) -> pa.Table:
        """The vocabulary file's table: ``value``, ``count``; row i holds id i + 2."""
        return pa.table({"value": self.values, "count": pa.array(self.counts, pa.int64())})

    def save(self, path: str | Path) -> None:
        atomic_write(path, arrow_file(self.table()))

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
