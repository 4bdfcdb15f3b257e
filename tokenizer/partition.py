"""The words pass: one unit of user-hash space -> its shards.

A unit is a run of spill partitions (or, when a partition holds several shards and does not
fit the memory budget, part of one: then rows of other shards are skipped on reading).  For
each segment, one after the other so that only one segment's events are in memory:

1. read the unit's rows from every task's spill file, in task order (= input order);
2. turn task codes into global codes (a lookup per attribute, Numba);
3. give users dense indices in output order (user hash, user id);
4. stable sort by (user, second) (a counting sort by user, then per user by time);
5. drop duplicate events (same user, microsecond and attribute values), counted;
6. cut words, truncate, cap (tokenizer/words.py), and gather the kept actions' vocabulary ids.

Then the user table's rows of the unit (each user's first row), the union of all users, and
one shard per shard index of the unit, written atomically.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.hashing import IntTable, StrTable, hash_int64, hash_strings, top_bits
from tokenizer.plan import Plan, SegmentPlan
from tokenizer.schema import UNK_ID
from tokenizer.shards import SHARD_DIR, SegmentArrays, atomic_write_table, build_shard_table
from tokenizer.spill import StreamRows, read_stream, take_strings
from tokenizer.timecols import US_PER_S
from tokenizer.users import (
    UserList,
    concat_users,
    empty_users,
    positions,
    ranks_of_codes,
    sort_users,
    table_users,
)
from tokenizer.words import (
    COL_T,
    COL_US,
    apply_task_luts,
    drop_rows,
    gather_ids,
    gather_sorted_ids,
    row_seconds,
    sort_rows,
    sorted_duplicates,
    split_words,
)


class DuplicateFound(Exception):  # noqa: N818 - a signal, turned into a BadRowError by the pipeline
    """--strict: a duplicate event (or user-table row), to be located in the input."""

    def __init__(self, kind: str, segment: str, key: int | str, value: int) -> None:
        super().__init__(kind, segment, key, value)
        self.kind, self.segment, self.key, self.value = kind, segment, key, value


def _key_at(rows: StreamRows, r: int) -> int | str:
    if rows.key_offsets is None:
        return int(rows.keys[r])
    return bytes(rows.keys[int(rows.key_offsets[r]) : int(rows.key_offsets[r + 1])]).decode("utf-8")


@dataclass
class Unit:
    index: int
    partitions: tuple[int, int]  # spill partitions [start, stop) to read
    shards: tuple[int, int]  # shards [first, stop) to write
    filter: bool = False  # the partitions hold users of other shards: skip their rows
    est_bytes: int = 0


@dataclass
class Lookups:
    """Per stream: task code -> global code (flat, with [task, attr] bases), and global code -> id."""

    task_luts: np.ndarray  # int32, all tables concatenated
    task_bases: np.ndarray  # int64 [T, K]
    ids: np.ndarray  # int32, all attributes' tables concatenated
    id_bases: np.ndarray  # int64 [K]


@dataclass
class WordsContext:
    plan: Plan
    out: Path
    spills: list[tuple[Path, np.ndarray]]  # per task: spill file and block index
    shard_bits: int
    lookups: dict[int, Lookups]  # per stream (segment index; len(segments) = user table)
    string_ids: bool
    user_attr_names: list[str] = field(default_factory=list)
    strict: bool = False
    segment_threads: int = 1  # threads for a unit's segments (when units are fewer than workers)


def shard_file(s: int) -> str:
    return f"{SHARD_DIR}/shard-{s:05d}.arrow"


# -- reading ---------------------------------------------------------------------------------------------
def _read(ctx: WordsContext, unit: Unit, stream: int, n_codes: int) -> StreamRows:
    rows = read_stream(ctx.spills, stream, range(*unit.partitions), n_codes, ctx.string_ids)
    if unit.filter and rows.rows:
        h = hash_int64(rows.keys) if rows.key_offsets is None else hash_strings(rows.key_offsets, rows.keys)
        s = top_bits(h, ctx.shard_bits)
        keep = np.flatnonzero((s >= unit.shards[0]) & (s < unit.shards[1]))
        if len(keep) < rows.rows:
            rows = _subset(rows, keep)
    return rows


def _subset(rows: StreamRows, keep: np.ndarray) -> StreamRows:
    bounds = np.searchsorted(keep, rows.task_bounds).astype(np.int64)
    if rows.key_offsets is None:
        keys, offs = rows.keys[keep], None
    else:
        offs, keys = take_strings(rows.key_offsets, rows.keys, keep)
    return StreamRows(rows.first[keep], keys, offs, rows.codes[keep], bounds)


def _local_users(rows: StreamRows, shard_bits: int) -> tuple[UserList, np.ndarray]:
    """(the stream's distinct users in output order, dense user index of each row)."""
    ok = np.ones(rows.rows, bool)
    if rows.key_offsets is None:
        table: IntTable | StrTable = IntTable(1 << 12)
        codes = table.codes(rows.keys, ok)
    else:
        table = StrTable(1 << 12)
        codes = table.codes_of_buffers(rows.key_offsets, rows.keys if len(rows.keys) else np.zeros(1, np.uint8), ok)
    users, order = sort_users(table_users(table), shard_bits)
    return users, ranks_of_codes(codes, order)


# -- one segment ----------------------------------------------------------------------------------------------
@dataclass
class SegmentWords:
    users: UserList
    arrays: SegmentArrays  # CSR over ``users``
    counts: dict[str, int]
    max_pos: int


def segment_words(ctx: WordsContext, unit: Unit, seg: SegmentPlan) -> SegmentWords:
    spec = seg.spec
    k = len(seg.attrs)
    rows = _read(ctx, unit, seg.index, k)
    if seg.time_shift:  # spilled from the reading anchor; positions count from the resolved start
        rows.first = rows.first + (np.int64(seg.time_shift) << np.int64(32))
    users, uidx = _local_users(rows, ctx.shard_bits)
    lk = ctx.lookups[seg.index]
    t0 = seg.window[0]
    sorted_rows, offsets = sort_rows(uidx, rows.first, rows.codes, rows.task_bounds, lk.task_luts, lk.task_bases,
                                     len(users))
    del uidx, rows  # moved into the sorted rows: free the read copies
    n_dup = 0
    if spec.drop_duplicates and len(sorted_rows):
        dup = sorted_duplicates(offsets, sorted_rows)
        n_dup = int(np.count_nonzero(dup))
        if n_dup and ctx.strict:
            j = int(np.argmax(dup))
            u = int(np.searchsorted(offsets, j, side="right")) - 1
            t_us = (int(sorted_rows[j, COL_T]) + t0) * US_PER_S + int(sorted_rows[j, COL_US])
            raise DuplicateFound("event", spec.name, users.key(u), t_us)
        if n_dup:
            sorted_rows, offsets = drop_rows(offsets, sorted_rows, dup)
        del dup
    t_sorted = row_seconds(sorted_rows, t0)
    t_local = seg.clock()(t_sorted) if seg.needs_local else None
    words = split_words(
        offsets,
        t_sorted,
        t_local,
        rule=spec.word_rule,
        position_unit=spec.position_unit,
        day_start_hour=spec.day_start_hour,
        gap_minutes=spec.gap_minutes,
        window_start_utc=seg.window[0],
        window_start_local=seg.window_start_local,
        max_words=spec.max_words,
        max_actions_per_word=spec.max_actions_per_word,
        word_overflow=spec.word_overflow,
    )
    attr = gather_sorted_ids(sorted_rows, words.keep, lk.ids, lk.id_bases)
    n_events = len(sorted_rows)
    n_actions = len(words.keep)
    # Actions of words dropped by truncation: what is neither kept nor capped.
    actions_truncated = n_events - n_actions - words.actions_capped
    arrays = SegmentArrays(spec.name, [a.name for a in seg.attrs], words.user_word_offsets, words.word_pos,
                           words.word_len, words.user_action_offsets, attr)
    if len(words.word_pos) and words.word_pos.min() < 0:
        raise AssertionError(f"segment {spec.name}: negative position (events before the window?)")
    counts = {
        "events": n_events,
        "duplicates": n_dup,
        "words": len(words.word_pos),
        "actions": n_actions,
        "words_truncated": words.words_truncated,
        "actions_capped": words.actions_capped,
        "actions_truncated": actions_truncated,
    }
    max_pos = int(words.word_pos.max()) if len(words.word_pos) else -1
    return SegmentWords(users, arrays, counts, max_pos)


# -- the user table -----------------------------------------------------------------------------------------
@dataclass
class UserRows:
    users: UserList  # in output order
    attr_ids: np.ndarray  # int32 [n, U]
    duplicates: int


def user_rows(ctx: WordsContext, unit: Unit) -> UserRows | None:
    up = ctx.plan.users
    if up is None:
        return None
    stream = len(ctx.plan.segments)
    k = len(up.attrs)
    rows = _read(ctx, unit, stream, k)
    lk = ctx.lookups[stream]
    if rows.rows and k:
        apply_task_luts(rows.codes, rows.task_bounds, lk.task_luts, lk.task_bases)
    first = first_rows(rows)
    if ctx.strict and len(first) < rows.rows:
        r = int(np.flatnonzero(np.isin(np.arange(rows.rows), first, invert=True))[0])
        raise DuplicateFound("user", "user", _key_at(rows, r), int(rows.first[r]))
    ids = gather_ids(rows.codes, first, np.arange(len(first), dtype=np.int64), lk.ids, lk.id_bases)
    if rows.key_offsets is None:
        keys = rows.keys[first]
        users = UserList(hash_int64(keys), keys, None, None)
    else:
        offs, data = take_strings(rows.key_offsets, rows.keys, first)
        users = UserList(hash_strings(offs, data), None, offs, data)
    users, order = sort_users(users, ctx.shard_bits)
    return UserRows(users, ids[order], rows.rows - len(first))


def first_rows(rows: StreamRows) -> np.ndarray:
    """Row of each user's first appearance (rows are in input order), in order of appearance."""
    ok = np.ones(rows.rows, bool)
    if rows.key_offsets is None:
        codes = IntTable(1 << 12).codes(rows.keys, ok)
    else:
        codes = StrTable(1 << 12).codes_of_buffers(
            rows.key_offsets, rows.keys if len(rows.keys) else np.zeros(1, np.uint8), ok
        )
    if len(codes) == 0:
        return np.zeros(0, np.int64)
    _, first = np.unique(codes, return_index=True)
    first.sort()
    return first.astype(np.int64)


# -- the unit --------------------------------------------------------------------------------------------------
def _expand(arrays: SegmentArrays, pos: np.ndarray, n: int) -> SegmentArrays:
    """CSR over the segment's users -> CSR over all n users of the unit (others get nothing)."""
    def widen(offsets: np.ndarray) -> np.ndarray:
        counts = np.zeros(n, np.int64)
        counts[pos] = np.diff(offsets)
        out = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=out[1:])
        return out

    return SegmentArrays(arrays.name, arrays.attributes, widen(arrays.user_word_offsets), arrays.word_pos,
                         arrays.word_len, widen(arrays.user_action_offsets), arrays.attr_ids)


def process_unit(ctx: WordsContext, unit: Unit) -> dict[str, Any]:
    """Words of every user of the unit, written as the unit's shards; returns the unit's counts."""
    if ctx.segment_threads > 1 and len(ctx.plan.segments) > 1:
        # Fewer units than workers (small inputs): the segments of the unit in parallel instead.
        with ThreadPoolExecutor(min(ctx.segment_threads, len(ctx.plan.segments))) as pool:
            seg_words = list(pool.map(lambda seg: segment_words(ctx, unit, seg), ctx.plan.segments))
    else:
        seg_words = [segment_words(ctx, unit, seg) for seg in ctx.plan.segments]
    urows = user_rows(ctx, unit)
    parts = [sw.users for sw in seg_words] + ([urows.users] if urows is not None else [])
    universe, _ = sort_users(concat_users(parts) if parts else empty_users(ctx.string_ids), ctx.shard_bits,
                             distinct=True)
    n = len(universe)
    table = universe.table()
    arrays = [_expand(sw.arrays, positions(table, sw.users), n) for sw in seg_words]
    u = len(ctx.user_attr_names)
    ua = np.full((n, u), UNK_ID, np.int32)
    if urows is not None and len(urows.users):
        ua[positions(table, urows.users)] = urows.attr_ids
    del table
    shard_of = top_bits(universe.h, ctx.shard_bits)
    bounds = np.searchsorted(shard_of, np.arange(unit.shards[0], unit.shards[1] + 1))
    if len(shard_of) and (shard_of[0] < unit.shards[0] or shard_of[-1] >= unit.shards[1]):
        raise AssertionError(f"unit {unit.index}: users outside its shards {unit.shards}")
    shards = []
    for j, s in enumerate(range(*unit.shards)):
        a, b = int(bounds[j]), int(bounds[j + 1])
        tbl = build_shard_table(universe.arrow(a, b), ctx.user_attr_names, ua[a:b],
                                [arr.slice_users(a, b) for arr in arrays])
        rel = shard_file(s)
        sha = atomic_write_table(ctx.out / rel, tbl)
        shards.append({"file": rel, "users": b - a, "sha256": sha})
    return {
        "unit": unit.index,
        "users": n,
        "shards": shards,
        "segments": {seg.name: sw.counts for seg, sw in zip(ctx.plan.segments, seg_words)},
        "max_pos": {seg.name: sw.max_pos for seg, sw in zip(ctx.plan.segments, seg_words)},
        "duplicate_users": urows.duplicates if urows is not None else 0,
        "user_rows": len(urows.users) if urows is not None else 0,
    }


def user_vocab_counts(ctx: WordsContext, partitions: range, sizes: list[int]) -> list[np.ndarray]:
    """Per user attribute: counts of global codes over each user's first row in ``partitions``.

    User vocabularies count users, not rows: a duplicate row of a user must not count, and
    which row is first is known only once a user's rows are together, here.
    """
    up = ctx.plan.users
    stream = len(ctx.plan.segments)
    k = len(up.attrs)
    rows = read_stream(ctx.spills, stream, partitions, k, ctx.string_ids)
    lk = ctx.lookups[stream]
    if rows.rows and k:
        apply_task_luts(rows.codes, rows.task_bounds, lk.task_luts, lk.task_bases)
    first = first_rows(rows)
    out = []
    for j in range(k):
        out.append(np.bincount(rows.codes[first, j], minlength=sizes[j]).astype(np.int64))
    return out
