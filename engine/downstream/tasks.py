"""Downstream tasks: label tables, their validation, and the split of labelled users.

A label table (Parquet, CSV or Arrow IPC; a file, directory or glob) has the columns

- ``user_id``: the same ids as the tokenized data (int or string)
- ``label``: 0/1 (or bool) for ``binary``; any scalar for ``multiclass``; a list of values of
  ``finetune.next_attribute`` for ``next`` (e.g. the genres a user bought after the window)
- ``split`` (optional): ``train`` / ``val`` / ``test`` per user, a split the user provides

Every problem with a table is a :class:`LabelError` that names the file, the column and the first
offending rows, because a wrong label file is the most common way a fine-tuning run goes wrong.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenizer.io import file_schema, read_table, resolve_inputs
from tokenizer.schema import FIRST_ID
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

Task = Literal["binary", "multiclass", "next"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "next")
SPLITS = ("train", "val", "test")
# The metric that early stopping and the results tables lead with.
PRIMARY_METRIC = {"binary": "auc", "multiclass": "auc", "next": "map@10"}


class LabelError(ValueError):
    """A label or split table is unusable; the message names the file, column and rows."""


@dataclass
class TaskData:
    """Labelled users of one task, aligned with dataset rows."""

    task: Task
    rows: np.ndarray  # int64 [n] dataset row of each labelled user
    y: np.ndarray | None = None  # int64 [n] (binary, multiclass)
    label_offsets: np.ndarray | None = None  # int64 [n + 1] (next): CSR of relevant item ids
    label_ids: np.ndarray | None = None  # int32 [nnz]
    n_outputs: int = 1
    classes: list[Any] = field(default_factory=list)  # multiclass: label value of each class index
    unknown_users: int = 0  # labelled users not in the tokenized data (reported, not used)
    split: np.ndarray | None = None  # object [n] "train"/"val"/"test" when the table provides one
    source: str = ""  # the label file, for messages
    # next, with exclude_seen: CSR of the item ids each user already has in the data (never ranked, since a
    # user rates a movie once: the relevant set holds only unseen items, and so must the ranked list)
    seen_offsets: np.ndarray | None = None  # int64 [n + 1]
    seen_ids: np.ndarray | None = None  # int64 [nnz]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: np.ndarray) -> TaskData:
        idx = np.asarray(idx, dtype=np.int64)
        out = copy.copy(self)
        out.rows = self.rows[idx]
        if self.y is not None:
            out.y = self.y[idx]
        if self.split is not None:
            out.split = self.split[idx]
        if self.label_offsets is not None:
            out.label_offsets, ids = _take_csr(self.label_offsets, self.label_ids, idx)
            out.label_ids = ids.astype(np.int32)
        if self.seen_offsets is not None:
            out.seen_offsets, out.seen_ids = _take_csr(self.seen_offsets, self.seen_ids, idx)
        return out

    def seen_csr(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets [n + 1], item ids) never to rank for each user, or None (exclude_seen off)."""
        return None if self.seen_offsets is None else (self.seen_offsets, self.seen_ids)

    def label_csr(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(int32 offsets [len(index) + 1], int32 ids) of the relevant sets of users ``index`` (next)."""
        lens = (self.label_offsets[index + 1] - self.label_offsets[index]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        return offsets, self.label_ids[_ranges(self.label_offsets[index], lens)].astype(np.int32)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths) + np.repeat(
        np.asarray(starts, dtype=np.int64), lengths)


def _take_csr(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``idx`` of a CSR (int64 offsets [n + 1], values): (int64 offsets [len(idx) + 1], their values)."""
    lens = np.diff(offsets)[idx]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), values[_ranges(offsets[idx], lens)]


def action_values(data: TokenizedData, rows: np.ndarray, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """(who int64 [n_actions], ids int64 [n_actions]): for every action of the users ``rows``, the position of
    its user in ``rows`` and its id of ``attribute`` (``segment.name``), in the id space of next-item scores."""
    seg_name, _, attr = attribute.partition(".")
    seg = data.segment(seg_name)
    k = seg.attributes.index(attr)
    rows = np.asarray(rows, dtype=np.int64)
    lens = seg.user_action_offsets[rows + 1] - seg.user_action_offsets[rows]
    ids = seg.attr_ids[_ranges(seg.user_action_offsets[rows], lens), k].astype(np.int64)
    return np.repeat(np.arange(len(rows), dtype=np.int64), lens), ids


def seen_items(data: TokenizedData, rows: np.ndarray, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets [len(rows) + 1], int64 ids): the distinct ids of ``attribute`` (``segment.name``) among
    each user's actions, in the id space of next-item scores."""
    who, ids = action_values(data, rows, attribute)
    base = int(ids.max(initial=0)) + 1
    who, ids = np.divmod(np.unique(who * base + ids), base)  # sorted distinct (user, id)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(who, minlength=len(rows)))]).astype(np.int64)
    return offsets, ids


def _rows_text(table: pa.Table, rows: np.ndarray, limit: int = 5) -> str:
    """'rows 3 (user_id 17), 9 (user_id 4)' for the first offending rows (0-based data rows)."""
    ids = table.column("user_id")
    shown = [f"{int(r)} (user_id {ids[int(r)].as_py()!r})" for r in rows[:limit]]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(shown) + more


def read_labels(labels_path: str | Path) -> pa.Table:
    """The label table with ``user_id``, ``label`` and, when present, ``split``."""
    files = resolve_inputs(labels_path)
    has_split = all("split" in file_schema(f).names for f in files)
    table = read_table(files, ["user_id", "label", *(["split"] if has_split else [])])
    where = str(labels_path)
    if table.num_rows == 0:
        raise LabelError(f"{where}: the label table is empty")
    ids = table.column("user_id")
    if ids.null_count:
        bad = np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))
        raise LabelError(f"{where}: column 'user_id': {len(bad)} rows have no user id (rows {bad[:5].tolist()})")
    if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type)):
        raise LabelError(f"{where}: column 'user_id': expected integer or string ids, got {ids.type}")
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        rows = np.flatnonzero(pc.equal(ids, pa.scalar(first, ids.type)).to_numpy(zero_copy_only=False))
        raise LabelError(f"{where}: column 'user_id': {len(dup)} users appear more than once, e.g. user_id "
                         f"{first!r} in rows {rows.tolist()[:5]}; give one row per user")
    labels = table.column("label")
    if labels.null_count:
        bad = np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))
        raise LabelError(f"{where}: column 'label': {len(bad)} of {table.num_rows} labels are missing, in rows "
                         f"{_rows_text(table, bad)}; drop those users or fill their labels")
    if has_split:
        split = table.column("split")
        if not pa.types.is_string(split.type):
            raise LabelError(f"{where}: column 'split': expected strings train/val/test, got {split.type}")
        bad = np.flatnonzero(~pc.is_in(split, value_set=pa.array(SPLITS)).fill_null(False)
                             .to_numpy(zero_copy_only=False))
        if len(bad):
            raise LabelError(f"{where}: column 'split': expected train, val or test, found "
                             f"{split[int(bad[0])].as_py()!r} in rows {_rows_text(table, bad)}")
    return table


def _binary_labels(labels: pa.Array, where: str, table: pa.Table) -> np.ndarray:
    t = labels.type
    if pa.types.is_boolean(t):
        return labels.to_numpy(zero_copy_only=False).astype(np.int64)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        example = labels[0].as_py()
        raise LabelError(f"{where}: column 'label': the binary task expects 0/1 (or true/false) labels, the column "
                         f"holds {t} values such as {example!r}; map them to 0/1, or use --task multiclass")
    y = labels.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((y != 0) & (y != 1))
    if len(bad):
        raise LabelError(f"{where}: column 'label': the binary task expects 0/1 labels, found "
                         f"{sorted({v.item() for v in y[bad][:50]})[:5]} in rows {_rows_text(table, bad)}")
    return y.astype(np.int64)


def user_rows(data: TokenizedData, ids: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """int64 dataset row of each id, -1 where the data lacks it.

    A hash lookup rather than ``TokenizedData.user_index``'s binary search: that one needs the users
    sorted by id across the whole directory, which a multi-shard (hash-partitioned) output is not.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    try:
        ids = ids.cast(data.user_ids.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise LabelError(f"{where}: column 'user_id': ids of type {ids.type} cannot match the {data.user_ids.type} "
                         f"user ids of the tokenized data {data.root}") from None
    return pc.index_in(ids, value_set=data.user_ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def load_task(labels_path: str | Path, data: TokenizedData, task: Task, next_attribute: str = "long.genre", *,
              strict_users: bool = False, exclude_seen: bool = False) -> TaskData:
    """Read a label table, check it, and align it with the tokenized users.

    Labelled users that the tokenized data lacks are left out with a warning that shows some of
    them (an error with ``strict_users``, or when no labelled user is known at all).
    ``exclude_seen`` (next): items the user already has in ``next_attribute`` are never ranked, by any
    model or baseline (MovieLens' next movie: a movie is rated once, so only unseen ones can come next).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected binary, multiclass or next)")
    where = str(labels_path)
    table = read_labels(labels_path)
    rows = user_rows(data, table.column("user_id"), where)
    known = rows >= 0
    unknown = int((~known).sum())
    if unknown:
        bad = np.flatnonzero(~known)
        msg = (f"{where}: {unknown} of {len(rows)} labelled users are not in the tokenized data {data.root}: rows "
               f"{_rows_text(table, bad)}")
        if unknown == len(rows):
            sample = data.user_ids.slice(0, 3).to_pylist()
            raise LabelError(f"{msg}; none of the labelled users is known. Is this the label table of this data? "
                             f"(the data's user ids look like {sample})")
        if strict_users:
            raise LabelError(msg)
        log.warning("%s; they are left out", msg)
    keep = pa.array(known)
    table = table.filter(keep)
    labels = table.column("label")
    rows = rows[known].astype(np.int64)
    split = (np.asarray(table.column("split").to_pylist(), dtype=object) if "split" in table.column_names
             else None)
    if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type):
        if task != "next":
            raise LabelError(f"{where}: column 'label': holds lists ({labels.type}); lists of items are labels of "
                             f"--task next, the {task} task expects one value per user")
    if task == "binary":
        y = _binary_labels(labels, where, table)
        if len(np.unique(y)) < 2:
            log.warning("%s: every known user has label %d; AUC is undefined", where, int(y[0]))
        return TaskData(task, rows, y=y, n_outputs=1, unknown_users=unknown, split=split, source=where)
    if task == "multiclass":
        if pa.types.is_floating(labels.type):
            log.warning("%s: column 'label' holds floats; each distinct value is a class", where)
        values = labels.to_pylist()
        classes = sorted(set(values), key=lambda v: (str(type(v)), v))
        if len(classes) < 2:
            raise LabelError(f"{where}: column 'label': the multiclass task needs at least two classes, "
                             f"found only {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[v] for v in values], dtype=np.int64)
        return TaskData(task, rows, y=y, n_outputs=len(classes), classes=classes, unknown_users=unknown,
                        split=split, source=where)
    td = _next_task(table, labels, rows, data, next_attribute, where, unknown, split)
    if exclude_seen:
        td.seen_offsets, td.seen_ids = seen_items(data, td.rows, next_attribute)
    return td


def _next_task(table: pa.Table, labels: pa.Array, rows: np.ndarray, data: TokenizedData, next_attribute: str,
               where: str, unknown: int, split: np.ndarray | None) -> TaskData:
    seg, _, attr = next_attribute.partition(".")
    try:
        vocab = data.vocab(seg, attr)
    except (KeyError, FileNotFoundError, ValueError):
        attrs = {s.name: s.attributes for s in data.segments}
        raise LabelError(f"finetune.next_attribute = {next_attribute!r}: the tokenized data {data.root} has no such "
                         f"attribute (segments and attributes: {attrs})") from None
    if not (pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type)):
        raise LabelError(f"{where}: column 'label': task 'next' expects a list of {next_attribute} values per user, "
                         f"got {labels.type} (e.g. {labels[0].as_py()!r})")
    flat = pc.list_flatten(labels)
    try:
        ids = pc.index_in(flat.cast(vocab.type), value_set=vocab).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise LabelError(f"{where}: column 'label': items of type {flat.type} cannot match the {next_attribute} "
                         f"vocabulary of type {vocab.type}") from None
    ids = np.where(np.isnan(ids.astype(np.float64)), -1, ids).astype(np.int64)
    lens = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    # Unknown items cannot be ranked; drop them from the relevant sets, and count them.
    keep = ids >= 0
    if (~keep).any():
        log.warning("%s: %d of %d label items are not in the %s vocabulary (too rare or unseen in the "
                    "pretraining window); they are left out", where, int((~keep).sum()), len(keep), next_attribute)
    kept = np.concatenate([[0], np.cumsum(keep)])
    new_lens = kept[offsets[1:]] - kept[offsets[:-1]]  # known items per user
    label_ids = (ids[keep] + FIRST_ID).astype(np.int32)
    label_offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
    has = new_lens > 0
    if not has.any():
        raise LabelError(f"{where}: column 'label': no user has a label item in the {next_attribute} vocabulary")
    if (~has).any():
        log.info("%s: %d users have no known label item and are left out", where, int((~has).sum()))
    out = TaskData("next", rows, label_offsets=label_offsets, label_ids=label_ids,
                   n_outputs=len(vocab) + FIRST_ID, unknown_users=unknown, split=split, source=where)
    return out.subset(np.flatnonzero(has))


# -- splits -----------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Positions (into a TaskData) of the train, validation (early stopping) and test users."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def split_indices(n: int, val_fraction: float, seed: int, test_fraction: float = 0.0) -> Split:
    """A fixed-seed split by user: ``test_fraction`` held out for evaluation, ``val_fraction`` (both shares of
    all n users) for early stopping, the rest for training."""
    perm = np.random.default_rng([seed, 20220222]).permutation(n)
    n_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if test_fraction > 0:
        n_test = max(1, n_test)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_test + n_val >= n:
        raise ValueError(f"{n} labelled users cannot be split into val {val_fraction} and test {test_fraction} "
                         "with users left to train on")
    return Split(np.sort(perm[n_test + n_val:]), np.sort(perm[n_test:n_test + n_val]), np.sort(perm[:n_test]))


def make_split(td: TaskData, val_fraction: float, test_fraction: float, seed: int,
               split_path: str | Path | None = None, data: TokenizedData | None = None) -> Split:
    """The split of ``td``: from ``split_path`` (a table of user_id, split), else the label table's own
    ``split`` column, else a fixed-seed random split.  A provided split without val users gets
    ``val_fraction`` of its train users for early stopping (seeded)."""
    split = td.split
    where = td.source
    if split_path is not None:
        if data is None:
            raise ValueError("make_split: a split file needs the tokenized data to map its user ids")
        split, where = _read_split_file(split_path, td, data), str(split_path)
    if split is None:
        return split_indices(len(td), val_fraction, seed, test_fraction)
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split == "val")
    test = np.flatnonzero(split == "test")
    if not len(train):
        raise LabelError(f"{where}: column 'split': no user is in 'train'")
    if not len(val) and val_fraction > 0:
        inner = split_indices(len(train), val_fraction / max(1e-9, 1 - test_fraction), seed)
        train, val = train[inner.train], train[inner.val]
    return Split(train, val, test)


def _read_split_file(path: str | Path, td: TaskData, data: TokenizedData) -> np.ndarray:
    table = read_table(resolve_inputs(path), ["user_id", "split"])
    split = table.column("split")
    if not pa.types.is_string(split.type):
        raise LabelError(f"{path}: column 'split': expected strings train/val/test, got {split.type}")
    rows = user_rows(data, table.column("user_id"), str(path))
    values = np.asarray(split.to_pylist(), dtype=object)
    bad = np.flatnonzero(~np.isin(values, SPLITS))
    if len(bad):
        raise LabelError(f"{path}: column 'split': expected train, val or test, found {values[bad[0]]!r} in rows "
                         f"{_rows_text(table, bad)}")
    by_row = dict(zip(rows.tolist(), values.tolist()))
    out = np.array([by_row.get(r) for r in td.rows.tolist()], dtype=object)
    missing = np.flatnonzero(out == None)  # noqa: E711 (element-wise comparison on an object array)
    if len(missing):
        ids = [data.user_ids[int(td.rows[i])].as_py() for i in missing[:5]]
        raise LabelError(f"{path}: {len(missing)} labelled users have no split, e.g. user_id {ids}; "
                         "give every labelled user a row")
    return out
