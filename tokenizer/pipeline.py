"""The tokenize pipeline: raw event tables -> vocabularies -> words -> shards + manifest.

    plan      resolve every input, check columns and types      (fails before any work)
    pass 1    stream every segment, count attribute values      -> vocab/*.arrow
    pass 2    stream again, drop bad rows (counted by reason), encode attributes to int32 ids
    partition all events of a set of users: stable sort by (user, time), cut words (Numba)
    write     shards of ``shard_users`` users, then manifest.json (last, atomically)

This version treats all users as one partition held in memory (int arrays only: ~8 bytes of
time, 8 of user index and 4 per attribute per event).  :func:`tokenize_partition` takes one
partition's events and returns its words, so hash-partitioned spill files can later feed it
partition by partition without touching the word code.

Users are identified across segments and the user table by their raw id and ordered by it
(ascending), which is the row order of the shards.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from tokenizer.io import (
    DEFAULT_BATCH_ROWS,
    Chunk,
    InputError,
    check_columns,
    check_time_type,
    check_user_type,
    count_rows,
    epoch_seconds,
    iter_chunks,
    local_seconds,
    plain,
    read_files,
    resolve_inputs,
    valid_mask,
)
from tokenizer.schema import DERIVED_COLUMNS, UNK_ID, SchemaConfig, SegmentSpec, UserAttributeSpec
from tokenizer.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_DIR,
    VOCAB_DIR,
    SegmentArrays,
    atomic_write_json,
    atomic_write_table,
    build_shard_table,
)
from tokenizer.vocab import ValueCounter, Vocab, attribute_values, vocab_file
from tokenizer.words import gather_rows, sort_by_user_time, split_words

USER = "user"  # the vocabulary namespace of user attributes (vocab/user.<name>.arrow)
DROP_REASONS = ("null_user", "null_time", "outside_window")
_REASON_TEXT = {
    "null_user": "null or empty user id",
    "null_time": "null time",
    "outside_window": "time outside the segment window",
}


# -- plan ---------------------------------------------------------------------------------------
@dataclass
class SegmentPlan:
    """What to read for one segment and how to judge its rows."""

    spec: SegmentSpec
    files: list[Path]
    user_column: str
    columns: list[str]  # columns read from the files: user, time, then attribute columns
    window: tuple[int, int]  # [start, end) UTC epoch seconds
    window_start_local: int
    timezone: str
    needs_local: bool  # daily rule, day positions or a time-derived attribute
    value_types: list[pa.DataType]  # per attribute: the vocabulary's value type when no data

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class UserPlan:
    files: list[Path]
    user_column: str
    specs: list[UserAttributeSpec]


def _value_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    return t


def _check_bucket_column(t: pa.DataType, where: str) -> None:
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
        raise InputError(f"{where}: bucketed column must be numeric, got {t}")


def plan_inputs(schema: SchemaConfig) -> tuple[list[SegmentPlan], UserPlan | None]:
    """Resolve inputs and check every file's columns and column types, before reading data."""
    plans = []
    user_types: dict[pa.DataType, Path] = {}  # users must compare equal across every input
    for name, spec in schema.segments.items():
        if name == USER and schema.user_attributes:
            raise InputError(f"segments.{USER}: the name {USER!r} is reserved for user attributes")
        files = resolve_inputs(schema.resolve(spec.path))
        user_col = spec.user_column or schema.data.user_column
        attr_cols = [a.column for a in spec.attributes if a.column not in DERIVED_COLUMNS]
        columns = list(dict.fromkeys([user_col, spec.time_column, *attr_cols]))
        schemas = check_columns(files, columns, f"segment {name}")
        value_types: list[pa.DataType] = []
        for a in spec.attributes:
            derived = a.column in DERIVED_COLUMNS
            value_types.append(
                pa.int64() if derived or a.buckets else _value_type(schemas[files[0]].field(a.column).type)
            )
        for f, fs in schemas.items():
            check_user_type(fs.field(user_col).type, f"{f}: column {user_col!r}")
            user_types.setdefault(_value_type(fs.field(user_col).type), f)
            check_time_type(fs.field(spec.time_column).type, f"{f}: column {spec.time_column!r}")
            for a in spec.attributes:
                if a.buckets is not None and a.column not in DERIVED_COLUMNS:
                    _check_bucket_column(fs.field(a.column).type, f"{f}: column {a.column!r}")
        start, end = schema.window_seconds(spec)
        needs_local = (
            spec.word_rule == "daily"
            or spec.position_unit == "day"
            or any(a.column in DERIVED_COLUMNS for a in spec.attributes)
        )
        plans.append(
            SegmentPlan(
                spec,
                files,
                user_col,
                columns,
                (start, end),
                int(local_seconds(np.array([start]), schema.data.timezone)[0]),
                schema.data.timezone,
                needs_local,
                value_types,
            )
        )
    users = None
    if schema.data.users:
        files = resolve_inputs(schema.resolve(schema.data.users))
        user_col = schema.data.user_column
        columns = list(dict.fromkeys([user_col, *(u.column for u in schema.user_attributes)]))
        schemas = check_columns(files, columns, "user table")
        for f, fs in schemas.items():
            check_user_type(fs.field(user_col).type, f"{f}: column {user_col!r}")
            user_types.setdefault(_value_type(fs.field(user_col).type), f)
            for u in schema.user_attributes:
                if u.buckets is not None:
                    _check_bucket_column(fs.field(u.column).type, f"{f}: column {u.column!r}")
        users = UserPlan(files, user_col, list(schema.user_attributes))
    elif schema.user_attributes:
        raise InputError("user_attributes are configured but [data].users names no user table")
    user_types.pop(pa.null(), None)  # an all-empty CSV column says nothing
    if len(user_types) > 1:
        found = "; ".join(f"{t} in {f}" for t, f in user_types.items())
        raise InputError(f"user ids must have one type (integer or string) in every input, found {found}")
    return plans, users


# -- bad rows -----------------------------------------------------------------------------------
@dataclass
class CleanChunk:
    """The good rows of a chunk: user ids, times, and the batch for the attribute columns."""

    users: pa.Array
    t_utc: np.ndarray  # int64 UTC epoch seconds
    t_local: np.ndarray | None  # int64 local wall-clock seconds (when the plan needs them)
    batch: pa.RecordBatch


def _empty_user(users: pa.Array) -> np.ndarray:
    """bool: null ids, and empty strings (a CSV's blank field, or a writer's placeholder)."""
    bad = ~valid_mask(users)
    if pa.types.is_string(users.type) or pa.types.is_binary(users.type):
        empty = pc.equal(pc.binary_length(users), 0).fill_null(False)
        bad |= empty.to_numpy(zero_copy_only=False)
    return bad


def clean_chunk(
    chunk: Chunk, plan: SegmentPlan, strict: bool, dropped: Counter, need_local: bool = True
) -> CleanChunk:
    """Drop the bad rows of a chunk, counting them by reason (or raising at the first if strict).

    Each bad row counts once, under its first reason in the order null_user, null_time,
    outside_window.
    """
    spec = plan.spec
    batch = chunk.batch
    users = plain(batch.column(plan.user_column))
    t, t_ok = epoch_seconds(
        batch.column(spec.time_column), spec.time_unit, f"{chunk.file}: column {spec.time_column!r}"
    )
    bad_user = _empty_user(users)
    bad_time = ~t_ok & ~bad_user
    start, end = plan.window
    outside = ~bad_user & ~bad_time & ((t < start) | (t >= end))
    masks = (bad_user, bad_time, outside)
    bad = bad_user | bad_time | outside
    if bad.any():
        if strict:
            i = int(np.argmax(bad))
            reason = next(r for r, m in zip(DROP_REASONS, masks) if m[i])
            detail = {
                "null_user": f"column {plan.user_column!r}",
                "null_time": f"column {spec.time_column!r}",
                "outside_window": f"t={int(t[i])} not in [{start}, {end}) UTC seconds",
            }[reason]
            where = f"{chunk.file}: row {chunk.row_start + i} (0-based)"
            raise ValueError(f"{where}: {_REASON_TEXT[reason]} ({detail}) in segment {plan.name!r}")
        for r, m in zip(DROP_REASONS, masks):
            dropped[r] += int(m.sum())
        keep = ~bad
        keep_pa = pa.array(keep)
        users = users.filter(keep_pa)
        t = t[keep]
        batch = batch.filter(keep_pa)
    t_local = local_seconds(t, plan.timezone) if plan.needs_local and need_local else None
    return CleanChunk(users, t, t_local, batch)


def _attribute_column(clean: CleanChunk, plan: SegmentPlan, k: int, where: str) -> pa.Array:
    spec = plan.spec.attributes[k]
    column = None if spec.column in DERIVED_COLUMNS else clean.batch.column(spec.column)
    return attribute_values(spec, column, clean.t_local, where)


def _chunks(plan: SegmentPlan, batch_rows: int, desc: str, progress: bool) -> Iterator[Chunk]:
    total = count_rows(plan.files) if progress else None
    with tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=not progress, leave=False) as bar:
        for chunk in iter_chunks(plan.files, plan.columns, batch_rows):
            yield chunk
            bar.update(chunk.batch.num_rows)


# -- pass 1: vocabularies -------------------------------------------------------------------------
def count_segment_vocabs(
    plan: SegmentPlan, *, strict: bool = False, batch_rows: int = DEFAULT_BATCH_ROWS, progress: bool = False
) -> list[Vocab]:
    """Stream one segment's good rows and build the vocabulary of each attribute."""
    counters = [ValueCounter(f"segment {plan.name}, attribute {a.name}") for a in plan.spec.attributes]
    dropped: Counter = Counter()
    derived = any(a.column in DERIVED_COLUMNS for a in plan.spec.attributes)  # else local time is unused
    for chunk in _chunks(plan, batch_rows, f"vocab {plan.name}", progress):
        clean = clean_chunk(chunk, plan, strict, dropped, need_local=derived)
        for k, counter in enumerate(counters):
            where = f"{chunk.file}: column {plan.spec.attributes[k].column!r}"
            counter.update(_attribute_column(clean, plan, k, where))
    vocabs = []
    for spec, counter, vtype in zip(plan.spec.attributes, counters, plan.value_types):
        values, counts = counter.result(vtype)
        vocabs.append(Vocab.from_counts(values, counts, spec.min_count, spec.max_vocab))
    return vocabs


# -- the user table -------------------------------------------------------------------------------
@dataclass
class UserTable:
    """Good rows of the user table: unique ids (first row wins) and their attribute values."""

    ids: pa.Array
    values: list[pa.Array]  # per user attribute, the values counted and encoded (bucketed etc.)
    dropped: dict[str, int] = field(default_factory=dict)


def read_user_table(plan: UserPlan, strict: bool = False) -> UserTable:
    """Read the (small) user table whole; null ids are bad rows, duplicate ids keep their first row."""
    table, spans = read_files(plan.files, [plan.user_column, *(u.column for u in plan.specs)])
    ids = plain(table.column(plan.user_column))
    bad = _empty_user(ids) if len(ids) else np.zeros(0, bool)
    if strict and bad.any():
        i = int(np.argmax(bad))
        file, row = _locate(spans, i)
        raise ValueError(
            f"{file}: row {row} (0-based): null or empty user id (column {plan.user_column!r}) "
            "in the user table"
        )
    keep = ~bad
    rows = np.flatnonzero(keep)
    good_ids = ids.filter(pa.array(keep)) if bad.any() else ids
    # First occurrence of each id, in file order.
    codes = pc.index_in(good_ids, value_set=pc.unique(good_ids)).to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    first.sort()
    if strict and len(first) < len(good_ids):
        dup = np.setdiff1d(np.arange(len(good_ids)), first)[0]
        file, row = _locate(spans, int(rows[dup]))
        raise ValueError(
            f"{file}: row {row} (0-based): duplicate user id {good_ids[int(dup)].as_py()!r} in the user table"
        )
    take = pa.array(rows[first])
    values = []
    for u in plan.specs:
        values.append(
            attribute_values(
                u, plain(table.column(u.column)).take(take), where=f"user table column {u.column!r}"
            )
        )
    dropped = {"null_user": int(bad.sum()), "duplicate_user": int(len(good_ids) - len(first))}
    return UserTable(ids.take(take), values, dropped)


def _locate(spans: list[tuple[Path, int]], i: int) -> tuple[Path, int]:
    for file, n in spans:
        if i < n:
            return file, i
        i -= n
    raise IndexError(i)


# -- pass 2: encoded events -----------------------------------------------------------------------
@dataclass
class SegmentEvents:
    """One segment's good events, attributes encoded, in input order."""

    users: pa.ChunkedArray  # raw user id of each event
    t_utc: np.ndarray  # int64 [n]
    t_local: np.ndarray | None  # int64 [n]
    attr_ids: np.ndarray  # int32 [n, K]
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


def read_segment_events(
    plan: SegmentPlan,
    vocabs: Sequence[Vocab],
    *,
    strict: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = False,
) -> SegmentEvents:
    """Stream a segment, drop and count bad rows, and encode each attribute to int32 ids."""
    k = len(plan.spec.attributes)
    dropped: Counter = Counter({r: 0 for r in DROP_REASONS})
    users, times, local, ids = [], [], [], []
    rows = 0
    for chunk in _chunks(plan, batch_rows, f"encode {plan.name}", progress):
        rows += chunk.batch.num_rows
        clean = clean_chunk(chunk, plan, strict, dropped)
        block = np.empty((len(clean.t_utc), k), np.int32)
        for j, vocab in enumerate(vocabs):
            where = f"{chunk.file}: column {plan.spec.attributes[j].column!r}"
            block[:, j] = vocab.encode(_attribute_column(clean, plan, j, where))
        users.append(clean.users)
        times.append(clean.t_utc)
        if clean.t_local is not None:
            local.append(clean.t_local)
        ids.append(block)
    user_type = users[0].type if users else pa.int64()
    try:
        user_arr = pa.chunked_array(users, type=user_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise InputError(f"segment {plan.name}: user id column type differs between files") from None
    return SegmentEvents(
        user_arr,
        np.concatenate(times) if times else np.zeros(0, np.int64),
        (np.concatenate(local) if local else np.zeros(0, np.int64)) if plan.needs_local else None,
        np.concatenate(ids) if ids else np.zeros((0, k), np.int32),
        rows,
        dict(dropped),
    )


# -- one partition: users -> words ------------------------------------------------------------------
def user_universe(id_arrays: Sequence[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """Sorted distinct user ids over every source (segments and the user table)."""
    types = {a.type for a in id_arrays if len(a)}
    if len(types) > 1:
        raise InputError(f"user ids have different types across inputs: {', '.join(map(str, types))}")
    if not types:
        t = id_arrays[0].type if id_arrays else pa.int64()
        return pa.array([], type=t)
    chunks = [c for a in id_arrays for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a]) if len(c)]
    uniq = pc.unique(pa.chunked_array(chunks))
    if isinstance(uniq, pa.ChunkedArray):
        uniq = uniq.combine_chunks()
    return uniq.take(pc.array_sort_indices(uniq))


def dense_user_index(users: pa.Array | pa.ChunkedArray, universe: pa.Array) -> np.ndarray:
    """int64 row of each event's user in the sorted ``universe`` (every id must be present)."""
    if len(users) == 0:
        return np.zeros(0, np.int64)
    if pa.types.is_integer(universe.type):
        u = universe.to_numpy()
        q = (
            users.to_numpy()
            if isinstance(users, pa.Array)
            else np.concatenate([c.to_numpy() for c in users.chunks])
        )
        lo, span = int(u[0]), int(u[-1]) - int(u[0]) + 1
        if span <= 4 * len(u) + (1 << 20):
            # Dense-ish ids (the usual case): a lookup table is one gather per event.
            lut = np.empty(span, np.int64)
            lut[u - lo] = np.arange(len(u), dtype=np.int64)
            return lut[q - lo]
        return np.searchsorted(u, q).astype(np.int64)
    idx = pc.index_in(users, value_set=universe)
    if isinstance(idx, pa.ChunkedArray):
        idx = idx.combine_chunks()
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class PartitionWords:
    """Output of one partition: per segment the CSR words, plus its counts."""

    segments: list[SegmentArrays]
    counts: dict[str, dict[str, int]]
    max_pos: dict[str, int]


def tokenize_partition(
    universe: pa.Array, plans: Sequence[SegmentPlan], events: Sequence[SegmentEvents]
) -> PartitionWords:
    """Sort each segment's events by (user, time), cut words, gather the kept attribute rows.

    ``universe`` is the partition's sorted user ids; a user with no events in a segment gets
    zero words there.
    """
    n_users = len(universe)
    segments, counts, max_pos = [], {}, {}
    for plan, ev in zip(plans, events):
        spec = plan.spec
        uidx = dense_user_index(ev.users, universe)
        perm, offsets = sort_by_user_time(uidx, ev.t_utc, n_users)
        t_local = ev.t_local[perm] if ev.t_local is not None else None
        words = split_words(
            offsets,
            ev.t_utc[perm],
            t_local,
            rule=spec.word_rule,
            position_unit=spec.position_unit,
            day_start_hour=spec.day_start_hour,
            gap_minutes=spec.gap_minutes,
            window_start_utc=plan.window[0],
            window_start_local=plan.window_start_local,
            max_words=spec.max_words,
            max_actions_per_word=spec.max_actions_per_word,
        )
        attr = gather_rows(np.ascontiguousarray(ev.attr_ids), perm, words.keep)
        segments.append(
            SegmentArrays(
                spec.name,
                [a.name for a in spec.attributes],
                words.user_word_offsets,
                words.word_pos,
                words.word_len,
                words.user_action_offsets,
                attr,
            )
        )
        counts[spec.name] = {
            "events": len(ev.t_utc),
            "words": len(words.word_pos),
            "actions": len(words.keep),
            "words_truncated": words.words_truncated,
            "actions_capped": words.actions_capped,
        }
        if len(words.word_pos) and words.word_pos.min() < 0:
            raise AssertionError(f"segment {spec.name}: negative position (events before the window?)")
        max_pos[spec.name] = int(words.word_pos.max()) if len(words.word_pos) else -1
    return PartitionWords(segments, counts, max_pos)


def encode_user_attributes(
    universe: pa.Array, table: UserTable | None, vocabs: Sequence[Vocab]
) -> np.ndarray:
    """int32 [N, U]: each user's attribute ids; 1 (unknown) for users without a row."""
    out = np.full((len(universe), len(vocabs)), UNK_ID, np.int32)
    if table is None or len(table.ids) == 0:
        return out
    rows = dense_user_index(table.ids, universe)
    for j, vocab in enumerate(vocabs):
        out[rows, j] = vocab.encode(table.values[j])
    return out


# -- the whole run ----------------------------------------------------------------------------------
def _load_vocabs(schema: SchemaConfig, vocab_dir: Path) -> tuple[dict[str, list[Vocab]], list[Vocab]]:
    seg = {
        name: [Vocab.load(vocab_file(vocab_dir, name, a.name)) for a in spec.attributes]
        for name, spec in schema.segments.items()
    }
    return seg, [Vocab.load(vocab_file(vocab_dir, USER, u.name)) for u in schema.user_attributes]


def tokenize(
    schema: SchemaConfig,
    out_dir: str | Path,
    *,
    shard_users: int = 100_000,
    strict: bool = False,
    progress: bool = True,
    vocab_dir: str | Path | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """Tokenize the schema's inputs into ``out_dir`` (FORMATS.md §4); returns the manifest.

    ``vocab_dir`` reuses existing vocabularies (e.g. a pretraining run's, so that fine-tuning
    data gets the same ids) instead of counting; they are copied into ``out_dir/vocab``.
    ``strict`` turns the first bad row into a ValueError naming the file and row.
    """
    if shard_users < 1:
        raise ValueError(f"shard_users must be >= 1, got {shard_users}")
    out = Path(out_dir)
    plans, user_plan = plan_inputs(schema)

    # A stale manifest must not vouch for shards that are about to be replaced.
    (out / MANIFEST).unlink(missing_ok=True)

    user_table = read_user_table(user_plan, strict) if user_plan else None
    if vocab_dir is not None:
        seg_vocabs, user_vocabs = _load_vocabs(schema, Path(vocab_dir))
    else:
        seg_vocabs = {
            p.name: count_segment_vocabs(p, strict=strict, batch_rows=batch_rows, progress=progress)
            for p in plans
        }
        user_vocabs = []
        for j, u in enumerate(schema.user_attributes):
            counter = ValueCounter(f"user attribute {u.name}")
            counter.update(user_table.values[j])
            values, counts = counter.result(user_table.values[j].type)
            user_vocabs.append(Vocab.from_counts(values, counts, u.min_count, u.max_vocab))
    for p in plans:
        for a, v in zip(p.spec.attributes, seg_vocabs[p.name]):
            v.save(vocab_file(out / VOCAB_DIR, p.name, a.name))
    for u, v in zip(schema.user_attributes, user_vocabs):
        v.save(vocab_file(out / VOCAB_DIR, USER, u.name))

    events = [
        read_segment_events(p, seg_vocabs[p.name], strict=strict, batch_rows=batch_rows, progress=progress)
        for p in plans
    ]
    rows_read = {p.name: ev.rows_read for p, ev in zip(plans, events)}
    dropped_rows = {p.name: ev.dropped for p, ev in zip(plans, events)}
    sources = [ev.users for ev in events] + ([user_table.ids] if user_table is not None else [])
    universe = user_universe(sources)
    part = tokenize_partition(universe, plans, events)
    user_attr_ids = encode_user_attributes(universe, user_table, user_vocabs)
    del events

    shards = write_shards(
        out,
        universe,
        [u.name for u in schema.user_attributes],
        user_attr_ids,
        part.segments,
        shard_users,
        progress,
    )

    seg_meta = {}
    for p, vocabs in zip(plans, (seg_vocabs[p.name] for p in plans)):
        num_positions = schema.num_positions(p.spec)
        if part.max_pos[p.name] >= num_positions:
            # Only a window edge across a DST change can do this; keep the table large enough.
            warnings.warn(
                f"segment {p.name}: position {part.max_pos[p.name]} >= num_positions {num_positions}; "
                "num_positions raised to fit",
                stacklevel=2,
            )
            num_positions = part.max_pos[p.name] + 1
        seg_meta[p.name] = {
            "attributes": [a.name for a in p.spec.attributes],
            "vocab_sizes": [v.size for v in vocabs],
            "dims": [a.dim for a in p.spec.attributes],
            "num_positions": num_positions,
            "max_words": p.spec.max_words,
        }
    counts: dict[str, Any] = {"users": len(universe), "events_read": sum(rows_read.values())}
    counts.update(part.counts)
    dropped: dict[str, dict[str, int]] = dict(dropped_rows)
    if user_table is not None:
        dropped[USER] = user_table.dropped
    manifest = {
        "format_version": FORMAT_VERSION,
        "schema": schema.to_dict(),
        "segments": seg_meta,
        "user_attributes": {
            "names": [u.name for u in schema.user_attributes],
            "vocab_sizes": [v.size for v in user_vocabs],
        },
        "counts": counts,
        "dropped": dropped,
        "shards": shards,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def write_shards(
    out: Path,
    user_ids: pa.Array,
    user_attr_names: Sequence[str],
    user_attr_ids: np.ndarray,
    segments: Sequence[SegmentArrays],
    shard_users: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Write users in runs of ``shard_users`` (at least one shard, even with no users)."""
    n = len(user_ids)
    n_shards = max(1, -(-n // shard_users))
    entries = []
    for s in tqdm(range(n_shards), desc="shards", unit="shard", disable=not progress, leave=False):
        a, b = s * shard_users, min(n, (s + 1) * shard_users)
        table = build_shard_table(
            user_ids.slice(a, b - a),
            user_attr_names,
            user_attr_ids[a:b],
            [seg.slice_users(a, b) for seg in segments],
        )
        rel = f"{SHARD_DIR}/shard-{s:05d}.arrow"
        sha = atomic_write_table(out / rel, table)
        entries.append({"file": rel, "users": b - a, "sha256": sha})
    keep = {Path(e["file"]).name for e in entries}
    for old in (out / SHARD_DIR).glob("shard-*.arrow"):
        if old.name not in keep:
            old.unlink()
    return entries
