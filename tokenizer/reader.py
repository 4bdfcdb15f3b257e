"""The reading pass: decode each input once, judge rows, code attributes, spill by user hash.

One *task* reads a run of files (or Parquet row groups) in order and, per batch:

1. routes rows to segments (one table with a segment column) or takes them all;
2. hashes the user ids (Numba) and normalises times to UTC microseconds;
3. codes every attribute with the task's value tables (see :mod:`tokenizer.coders`);
4. judges each row, first reason wins: ``null_user`` (null or empty id), ``invalid_utf8`` (the id
   or an attribute value is not UTF-8), ``null_time``, ``bad_time`` (unparseable),
   ``outside_window``; bad rows are counted (``--strict``: the first one raises, naming its file,
   row and column);
5. counts the attribute codes of good rows (vocabulary counts), adds the user hashes to a
   HyperLogLog sketch (the shard count), and appends good rows to the task's spill file,
   partitioned by the top bits of the user hash.

The user table goes the same way (its rows carry their sequence number instead of a time, so
that the words pass can keep each user's first row).

With ``--num-shards K --shard-index i`` every job reads everything (vocabularies count all
rows), but spills, and counts as its own, only the rows of users in its hash range; rows whose
user id is unusable are counted by job 0.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenizer.coders import Coder, IntRangeError, as_int64, valid_of
from tokenizer.hashing import (
    HLL_BITS,
    IntTable,
    StrTable,
    hash_int64,
    hash_strings,
    hll_update,
    string_buffers,
    top_bits,
    utf8_invalid,
)
from tokenizer.io import iter_piece
from tokenizer.plan import KIND_INT, Piece, Plan, SegmentPlan, type_family
from tokenizer.spill import (
    Block,
    SpillWriter,
    partition_order,
    scatter_fixed,
    take_rows_2d,
    take_rows_i64,
    take_strings,
)
from tokenizer.timecols import US_PER_S, to_micros
from tokenizer.vocab import Vocab

REASONS = ("null_user", "invalid_utf8", "null_time", "bad_time", "outside_window", "duplicate")
USER_REASONS = ("null_user", "invalid_utf8", "duplicate_user")
REASON_TEXT = {
    "null_user": "null or empty user id",
    "invalid_utf8": "string that is not valid UTF-8",
    "null_time": "null time",
    "bad_time": "time that does not parse",
    "outside_window": "time outside the segment window",
    "duplicate": "duplicate event",
    "duplicate_user": "duplicate user id",
}
SEQ_TASK_SHIFT = 40  # user-table row sequence = task << 40 | row within the task


class BadRowError(ValueError):
    """--strict: a bad row, named by file, row, column and reason."""


@dataclass(frozen=True)
class JobRange:
    """The users of one job of ``--num-shards K``: shards [first, stop) of 2**shard_bits."""

    shard_bits: int
    first: int
    stop: int

    def owns(self, h: np.ndarray) -> np.ndarray:
        s = top_bits(h, self.shard_bits)
        return (s >= self.first) & (s < self.stop)


@dataclass
class ReadOptions:
    partition_bits: int
    job: JobRange | None = None  # None: a single run owns every user
    job_index: int = 0
    strict: bool = False
    seeds: dict[tuple[int, int], Vocab] = field(default_factory=dict)  # (stream, attr) -> given vocabulary
    batch_rows: int = 1 << 18
    use_threads: bool = True
    progress: Callable[[int], None] | None = None
    cancel: threading.Event | None = None
    pending_bytes: int = 64 << 20  # spill rows buffered per task before they are written


@dataclass
class StreamState:
    """A task's bookkeeping for one stream (a segment, or the user table)."""

    coders: list[Coder]
    reasons: tuple[str, ...]
    rows: int = 0  # rows counted by this job
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(len(REASONS), np.int64))
    # First and last time (UTC seconds), over every job's rows, of the rows with a user and a valid
    # time ("timed": a run that keeps nothing is diagnosed with it) and of those within the window
    # edges the schema gives ("in": open edges are resolved from it, tokenizer/window.py).
    span: dict[str, list[int]] = field(default_factory=dict)

    def seen(self, key: str, t_sec: np.ndarray) -> None:
        if len(t_sec):
            lo, hi = int(t_sec.min()), int(t_sec.max())
            old = self.span.get(key)
            self.span[key] = [lo, hi] if old is None else [min(old[0], lo), max(old[1], hi)]

    def result(self) -> dict[str, Any]:
        return {"rows": self.rows, "dropped": {r: int(self.dropped[i]) for i, r in enumerate(self.reasons)},
                "span": self.span}


@dataclass
class UserKeys:
    """User ids of a batch: hash, usable mask, invalid-UTF-8 mask, and the raw keys."""

    h: np.ndarray
    ok: np.ndarray  # not null, not empty, valid UTF-8
    null: np.ndarray
    bad_utf8: np.ndarray
    values: np.ndarray | None  # int64 ids
    offsets: np.ndarray | None  # string ids
    data: np.ndarray | None

    def take(self, rows: np.ndarray) -> UserKeys:
        if self.values is not None:
            return UserKeys(self.h[rows], self.ok[rows], self.null[rows], self.bad_utf8[rows], self.values[rows],
                            None, None)
        offsets, data = take_strings(self.offsets, self.data, rows)
        return UserKeys(self.h[rows], self.ok[rows], self.null[rows], self.bad_utf8[rows], None, offsets, data)


def user_keys(arr: pa.Array, column: str | None = None) -> UserKeys:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    valid = valid_of(arr)
    n = len(arr)
    if pa.types.is_null(arr.type):
        z = np.zeros(n, bool)
        return UserKeys(np.zeros(n, np.uint64), z, ~z, z, np.zeros(n, np.int64), None, None)
    if type_family(arr.type) == KIND_INT:
        try:
            arr = as_int64(arr)
        except IntRangeError as e:
            e.column = column
            raise
        buf = arr.buffers()[1]
        values = np.frombuffer(buf, np.int64, count=n, offset=arr.offset * 8) if buf else np.zeros(n, np.int64)
        z = np.zeros(n, bool)
        return UserKeys(hash_int64(values), valid, ~valid, z, values, None, None)
    offsets, data = string_buffers(arr)
    valid &= np.diff(offsets) > 0
    bad = utf8_invalid(offsets, data) & valid
    return UserKeys(hash_strings(offsets, data), valid & ~bad, ~valid, bad, None, offsets, data)


class _BatchColumns:
    """One batch's columns decoded once for every segment that reads them (one table with a segment
    column): times in UTC microseconds, and attribute codes of coders that share a value table.  A
    segment takes its rows from the whole-batch arrays (no take of the Arrow columns)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self._times: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._codes: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def times(self, column: str, unit: str, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (column, unit)
        if key not in self._times:
            self._times[key] = to_micros(self.batch.column(column), unit)
        t = self._times[key]
        return t if rows is None else (t[0][rows], t[1][rows], t[2][rows])

    def codes(self, coder: Coder, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        # Coders that share a table give the same codes for a column: code it once per batch.
        key = id(coder.table) if coder.table is not None else id(coder)
        if key not in self._codes:  # (an IntRangeError names a row of the whole batch: the file's row)
            self._codes[key] = coder.encode(self.batch.column(coder.attr.column), None)
        c, bad = self._codes[key]
        if rows is None:
            return c, bad
        return c[rows], (bad[rows] if bad is not None and bad[rows].any() else None)


class TaskReader:
    """Runs one reading task (see the module doc)."""

    def __init__(self, plan: Plan, task: int, spill_path: Path | None, opts: ReadOptions) -> None:
        self.plan = plan
        self.task = task
        self.opts = opts
        self.spill = SpillWriter(spill_path, max_pending_bytes=opts.pending_bytes)
        self.hll = np.zeros(1 << HLL_BITS, np.uint8)
        self.streams: dict[int, StreamState] = {}
        # Segments that read one table share a value table per column (and kind): a column is then
        # coded once per batch for all of them.  A table holds values of every segment, and each
        # coder counts only its own rows; values a segment never counted stay out of its
        # vocabulary (tokenizer/coders.py).  Seeded coders (--vocab) keep their own tables.
        shared: dict[tuple[int, str, str], IntTable | StrTable] = {}
        for seg in plan.segments:
            coders = []
            for k, a in enumerate(seg.attrs):
                seed = opts.seeds.get((seg.index, k))
                coder = Coder(a, seed, table=shared.get((seg.source, a.column, a.kind)) if seed is None else None)
                if seed is None and coder.table is not None:
                    shared.setdefault((seg.source, a.column, a.kind), coder.table)
                coders.append(coder)
            self.streams[seg.index] = StreamState(coders, REASONS)
        self.user_stream = len(plan.segments)
        if plan.users is not None:
            self.streams[self.user_stream] = StreamState(
                [Coder(a, opts.seeds.get((self.user_stream, k))) for k, a in enumerate(plan.users.attrs)],
                USER_REASONS,
            )
        self.unrouted: dict[int, int] = {}
        self.piece_rows: list[int] = []
        self.source_rows: dict[int, int] = {}
        self.rows_read = 0
        self.user_rows_read = 0
        self._seq = np.int64(task) << SEQ_TASK_SHIFT
        self._clocks = {seg.index: seg.clock() for seg in plan.segments if seg.derived}
        self._routes: dict[int, tuple[IntTable | StrTable, np.ndarray]] = {}

    # -- driving -----------------------------------------------------------------------------------------
    def run(self, pieces: list[Piece]) -> dict[str, Any]:
        try:
            for piece in pieces:
                src = self.plan.sources[piece.source]
                path = src.files[piece.file]
                self.piece_rows.append(0)
                for row, batch in iter_piece(
                    path, src.columns, rg_start=piece.rg_start, rg_stop=piece.rg_stop, row_start=piece.row_start,
                    batch_rows=self.opts.batch_rows, dictionary_columns=src.dictionary_columns,
                    use_threads=self.opts.use_threads,
                ):
                    if self.opts.cancel is not None and self.opts.cancel.is_set():
                        raise InterruptedError("cancelled")
                    try:
                        self._batch(piece.source, path, row, batch)
                    except IntRangeError as e:
                        raise e.located(path, row) from None
                    self.piece_rows[-1] += batch.num_rows
                    if self.opts.progress is not None:
                        self.opts.progress(batch.num_rows)
            size = self.spill.close()
        except BaseException:
            self.spill.abort()
            raise
        return self._result(size)

    def _batch(self, source: int, path: Path, row: int, batch: pa.RecordBatch) -> None:
        src = self.plan.sources[source]
        if src.is_users:
            self.user_rows_read += batch.num_rows
            self._user_rows(path, row, batch)
            return
        self.rows_read += batch.num_rows
        self.source_rows[source] = self.source_rows.get(source, 0) + batch.num_rows
        user_col = self.plan.segments[src.segments[0]].user_column
        keys = user_keys(batch.column(user_col), user_col)
        # Every usable id counts towards the number of users, routed or not: the count must be
        # the same as the one --num-shards jobs make from the user column alone.
        hll_update(self.hll, keys.h, keys.ok)
        view = _BatchColumns(batch)
        if src.segment_column is None:
            self._segment_rows(self.plan.segments[src.segments[0]], path, row, view, None, keys)
            return
        route = self._route(source, batch.column(src.segment_column))
        for seg_index in src.segments:
            rows = np.flatnonzero(route == seg_index)
            if len(rows) == len(route):
                self._segment_rows(self.plan.segments[seg_index], path, row, view, None, keys)
            elif len(rows):
                self._segment_rows(self.plan.segments[seg_index], path, row, view, rows, keys.take(rows))
        lost = np.flatnonzero(route < 0)
        if len(lost):
            mine = self._mine(keys.take(lost))
            self.unrouted[source] = self.unrouted.get(source, 0) + int(mine.sum())

    def _route(self, source: int, column: pa.Array) -> np.ndarray:
        """Segment index of each row (-1: its value names no segment, or is null)."""
        src = self.plan.sources[source]
        if source not in self._routes:
            ints = all(isinstance(v, int) for v, _ in src.routes)
            table = IntTable() if ints else StrTable()
            vals = [v for v, _ in src.routes]
            ok = np.ones(len(vals), bool)
            if ints:
                table.codes(np.array(vals, np.int64), ok)
            else:
                table.codes(pa.array([str(v) for v in vals]), ok)
            self._routes[source] = (table, np.array([-1] + [s for _, s in src.routes], np.int64))
        table, seg_of = self._routes[source]
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_dictionary(column.type):
            idx = column.indices.fill_null(len(column.dictionary)).to_numpy(zero_copy_only=False)
            per_entry = self._route_plain(table, seg_of, column.dictionary)
            return np.append(per_entry, -1)[idx]
        return self._route_plain(table, seg_of, column)

    @staticmethod
    def _route_plain(table: IntTable | StrTable, seg_of: np.ndarray, column: pa.Array) -> np.ndarray:
        valid = valid_of(column)
        if pa.types.is_null(column.type):
            return np.full(len(column), -1, np.int64)
        if isinstance(table, IntTable):
            if type_family(column.type) != KIND_INT:
                return np.full(len(column), -1, np.int64)
            codes = table.codes(column.cast(pa.int64()).to_numpy(zero_copy_only=False), valid, insert=False)
        else:
            if type_family(column.type) == KIND_INT:
                column = column.cast(pa.string())
            codes = table.codes(column, valid, insert=False)
        return np.where(codes > 0, seg_of[np.maximum(codes, 0)], -1)

    def _mine(self, keys: UserKeys) -> np.ndarray:
        """Rows counted by this job: owners by user hash; unusable ids go to job 0."""
        if self.opts.job is None:
            return np.ones(len(keys.h), bool)
        mine = keys.ok & self.opts.job.owns(keys.h)
        if self.opts.job_index == 0:
            mine |= ~keys.ok
        return mine

    # -- segments -------------------------------------------------------------------------------------------
    def _segment_rows(
        self, seg: SegmentPlan, path: Path, row: int, view: _BatchColumns, rows: np.ndarray | None, keys: UserKeys
    ) -> None:
        """The rows ``rows`` of the batch (None: all) that belong to segment ``seg``."""
        spec = seg.spec
        state = self.streams[seg.index]
        n = len(rows) if rows is not None else view.batch.num_rows
        t_us, t_null, t_bad = view.times(spec.time_column, spec.time_unit, rows)
        t_sec = np.floor_divide(t_us, US_PER_S)
        start, end = seg.window
        t_local = self._clocks[seg.index](t_sec) if seg.derived else None
        codes = np.empty((n, len(seg.attrs)), np.int32)
        bad_utf8 = keys.bad_utf8.copy()
        utf8_cols: list[tuple[str, np.ndarray]] = []
        for k, (attr, coder) in enumerate(zip(seg.attrs, state.coders)):
            if attr.derived:
                c, bu = coder.encode(None, t_local)
            else:
                c, bu = view.codes(coder, rows)
            codes[:, k] = c
            if bu is not None:
                bad_utf8 |= bu
                utf8_cols.append((attr.column, bu))
        # First reason wins, in the order of REASONS.
        masks = [keys.null]
        taken = keys.null.copy()
        for m in (bad_utf8, t_null, t_bad):
            masks.append(m & ~taken)
            taken |= m
        timed = ~taken
        state.seen("timed", t_sec[timed])
        rw = seg.read
        if rw.is_open:  # rows within the edges the schema gives; the data decides the others
            inside = timed
            if not rw.open_start:
                inside = inside & (t_sec >= start)
            if not rw.open_end:
                inside = inside & (t_sec < end)
            state.seen("in", t_sec[inside])
        outside = timed & ((t_sec < start) | (t_sec >= end))
        masks.append(outside)
        bad = taken | outside
        mine = self._mine(keys)
        if bad.any():
            if self.opts.strict:
                self._raise_first(seg, path, row, rows, masks, keys, utf8_cols, t_sec)
            for i, m in enumerate(masks):
                state.dropped[i] += int(np.count_nonzero(m & mine))
        state.rows += int(np.count_nonzero(mine))
        good = ~bad
        for k, coder in enumerate(state.coders):
            coder.count(codes, k, good)
        # Spilled time: seconds since the window start (< 2**31) and microseconds, in one int64,
        # so that the words pass needs no division.
        when = ((t_sec - start) << 32) | (t_us - t_sec * US_PER_S)
        self._spill(seg.index, keys, good, when, codes, all_partitions=False)

    def _raise_first(self, seg, path, row, rows, masks, keys, utf8_cols, t_sec) -> None:
        first = min(int(np.argmax(m)) for m in masks if m.any())
        reason = next(r for r, m in zip(REASONS, masks) if m[first])
        spec = seg.spec
        if reason == "null_user":
            detail = f"column {seg.user_column!r}"
        elif reason == "invalid_utf8":
            col = seg.user_column if keys.bad_utf8[first] else next(c for c, m in utf8_cols if m[first])
            detail = f"column {col!r}"
        elif reason == "outside_window":
            detail = f"t={int(t_sec[first])} not in [{seg.window[0]}, {seg.window[1]}) UTC seconds"
        else:
            detail = f"column {spec.time_column!r}"
        at = row + (int(rows[first]) if rows is not None else first)
        raise BadRowError(f"{path}: row {at} (0-based): {REASON_TEXT[reason]} ({detail}) in segment {seg.name!r}")

    # -- the user table ---------------------------------------------------------------------------------------
    def _user_rows(self, path: Path, row: int, batch: pa.RecordBatch) -> None:
        up = self.plan.users
        state = self.streams[self.user_stream]
        n = batch.num_rows
        keys = user_keys(batch.column(up.user_column), up.user_column)
        codes = np.empty((n, len(up.attrs)), np.int32)
        bad_utf8 = keys.bad_utf8.copy()
        utf8_cols: list[tuple[str, np.ndarray]] = []
        for k, (attr, coder) in enumerate(zip(up.attrs, state.coders)):
            c, bu = coder.encode(batch.column(attr.column), None)
            codes[:, k] = c
            if bu is not None:
                bad_utf8 |= bu
                utf8_cols.append((attr.column, bu))
        masks = [keys.null, bad_utf8 & ~keys.null]
        bad = keys.null | bad_utf8
        mine = self._mine(keys)
        if bad.any():
            if self.opts.strict:
                first = int(np.argmax(bad))
                if keys.null[first]:
                    reason, col = "null_user", up.user_column
                else:
                    reason = "invalid_utf8"
                    col = up.user_column if keys.bad_utf8[first] else next(c for c, m in utf8_cols if m[first])
                raise BadRowError(
                    f"{path}: row {row + first} (0-based): {REASON_TEXT[reason]} (column {col!r}) in the user table"
                )
            for i, m in enumerate(masks):
                state.dropped[i] += int(np.count_nonzero(m & mine))
        state.rows += int(np.count_nonzero(mine))
        hll_update(self.hll, keys.h, keys.ok)
        seq = self._seq + np.arange(n, dtype=np.int64)
        self._seq += n
        # Every job spills the whole user table: user vocabularies count each user's first row,
        # which needs all of them.  The words pass reads only its own users.
        self._spill(self.user_stream, keys, ~bad, seq, codes, all_partitions=True)

    # -- spilling -------------------------------------------------------------------------------------------
    def _spill(
        self, stream: int, keys: UserKeys, keep: np.ndarray, first: np.ndarray, codes: np.ndarray, all_partitions: bool
    ) -> None:
        if not all_partitions and self.opts.job is not None:
            keep = keep & self.opts.job.owns(keys.h)
        bits = self.opts.partition_bits
        n_parts = 1 << bits
        if bits == 0 and keep.all() and keys.values is not None:
            # One partition and no bad rows: the batch's arrays are the block (no copy).
            self.spill.add(stream, 0, Block(first, keys.values, None, codes))
            return
        part = top_bits(keys.h, bits)
        part[~keep] = -1
        if keys.values is not None:
            bounds, first_s, keys_s, codes_s = scatter_fixed(part, n_parts, first, keys.values, codes)
            offs_s = None
        else:
            order, bounds = partition_order(part, n_parts)
            first_s = take_rows_i64(first, order)
            codes_s = take_rows_2d(codes, order)
            offs_s, keys_s = take_strings(keys.offsets, keys.data, order)
        if bounds[-1] == 0:
            return
        for p in np.flatnonzero(np.diff(bounds)):
            a, b = int(bounds[p]), int(bounds[p + 1])
            if offs_s is None:
                block = Block(first_s[a:b], keys_s[a:b], None, codes_s[a:b])
            else:
                o = offs_s[a : b + 1]
                block = Block(first_s[a:b], keys_s[int(o[0]) : int(o[-1])], o - o[0], codes_s[a:b])
            self.spill.add(stream, int(p), block)

    # -- result ----------------------------------------------------------------------------------------------
    def _result(self, spill_size: int) -> dict[str, Any]:
        return {
            "streams": {s: st.result() for s, st in self.streams.items()},
            "coders": {s: [c.state() for c in st.coders] for s, st in self.streams.items()},
            "unrouted": self.unrouted,
            "rows_read": self.rows_read,
            "piece_rows": self.piece_rows,
            "source_rows": self.source_rows,
            "user_rows_read": self.user_rows_read,
            "hll": self.hll,
            "index": self.spill.index_array(),
            "spill_size": spill_size,
            "blocks": self.spill.blocks if self.spill.path is None else None,
        }


# -- task results on disk (for resuming) -------------------------------------------------------------------------
def save_result(path: Path, result: dict[str, Any]) -> None:
    """Arrays in ``<path>.npz``, the rest in ``<path>.json`` (written last: it marks the task done)."""
    arrays = {"hll": result["hll"], "index": result["index"]}
    for s, states in result["coders"].items():
        for k, st in enumerate(states):
            for name, arr in st.items():
                arrays[f"c_{s}_{k}_{name}"] = arr
    npz = path.with_suffix(".npz")
    tmp = npz.with_name(npz.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(npz)
    meta = {k: result[k] for k in ("rows_read", "user_rows_read", "spill_size", "piece_rows")}
    meta["streams"] = {str(s): v for s, v in result["streams"].items()}
    meta["unrouted"] = {str(s): v for s, v in result["unrouted"].items()}
    meta["source_rows"] = {str(s): v for s, v in result["source_rows"].items()}
    meta["coders"] = {str(s): len(v) for s, v in result["coders"].items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(path)


def load_result(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    with np.load(path.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    coders: dict[int, list[dict[str, np.ndarray]]] = {}
    for s, n in meta["coders"].items():
        coders[int(s)] = []
        for k in range(n):
            prefix = f"c_{s}_{k}_"
            coders[int(s)].append({key[len(prefix):]: v for key, v in arrays.items() if key.startswith(prefix)})
    return {
        "streams": {int(s): v for s, v in meta["streams"].items()},
        "coders": coders,
        "unrouted": {int(s): v for s, v in meta["unrouted"].items()},
        "source_rows": {int(s): v for s, v in meta["source_rows"].items()},
        "rows_read": meta["rows_read"],
        "piece_rows": meta["piece_rows"],
        "user_rows_read": meta["user_rows_read"],
        "spill_size": meta["spill_size"],
        "hll": arrays["hll"],
        "index": arrays["index"],
    }


# -- the user count of --num-shards jobs -----------------------------------------------------------------------
def count_users(plan: Plan, batch_rows: int = 1 << 18, progress: Callable[[int], None] | None = None
                ) -> tuple[np.ndarray, dict[int, int]]:
    """(HyperLogLog registers, rows per event source) from the user id columns alone.

    Equal to what a single run's reading pass gathers, so that every job of ``--num-shards``
    picks the same shard count as a single run before it spills anything.
    """
    hll = np.zeros(1 << HLL_BITS, np.uint8)
    rows: dict[int, int] = {}
    for si, src in enumerate(plan.sources):
        col = plan.users.user_column if src.is_users else plan.segments[src.segments[0]].user_column
        for f in src.files:
            for first_row, batch in iter_piece(f, [col], batch_rows=batch_rows):
                try:
                    keys = user_keys(batch.column(0), col)
                except IntRangeError as e:
                    raise e.located(f, first_row) from None
                hll_update(hll, keys.h, keys.ok)
                if not src.is_users:
                    rows[si] = rows.get(si, 0) + batch.num_rows
                if progress is not None:
                    progress(batch.num_rows)
    return hll, rows


# -- --strict: where a duplicate came from ------------------------------------------------------------------------
def locate_user_row(plan: Plan, tasks: list[list[Piece]], piece_rows: list[list[int]], seq: int) -> tuple[Path, int]:
    """(file, row) of the user-table row with sequence number ``seq``."""
    task, local = seq >> SEQ_TASK_SHIFT, seq & ((1 << SEQ_TASK_SHIFT) - 1)
    for piece, n in zip(tasks[task], piece_rows[task]):
        if not plan.sources[piece.source].is_users:
            continue
        if local < n:
            return plan.sources[piece.source].files[piece.file], piece.row_start + local
        local -= n
    raise AssertionError(f"user-table row {seq} not found")


def locate_event(plan: Plan, segment: str, key: int | str, t_us: int, batch_rows: int = 1 << 18) -> tuple[Path, int]:
    """(file, row) of the second event of ``segment`` with this user and microsecond (a rescan:
    only --strict needs it, once)."""
    seg = plan.segment(segment)
    src = plan.sources[seg.source]
    cols = [seg.user_column, seg.spec.time_column] + ([src.segment_column] if src.segment_column else [])
    seen = 0
    for f in src.files:
        for row, batch in iter_piece(f, cols, batch_rows=batch_rows):
            keys = user_keys(batch.column(0))
            t_us_b, _, _ = to_micros(batch.column(1), seg.spec.time_unit)
            if keys.values is not None:
                same = keys.ok & (keys.values == key)
            else:
                col = batch.column(0)
                col = col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
                eq = pc.equal(col.cast(pa.string()), pa.scalar(str(key)))
                same = keys.ok & eq.fill_null(False).to_numpy(zero_copy_only=False)
            same &= t_us_b == t_us
            for i in np.flatnonzero(same):
                seen += 1
                if seen == 2:
                    return f, row + int(i)
    raise AssertionError(f"duplicate of user {key!r} at {t_us} us not found in segment {segment}")
