"""The plan of a tokenize run, made before any data is read.

- Resolve every input, read every file's schema, and check the configured columns and their
  types: a missing or mistyped column is an :class:`InputError` naming the file and column,
  raised before any work starts.
- Group segments that read the same table (one table with a segment column) into one source,
  so that the table is decoded once.
- Split the inputs into tasks (runs of files or Parquet row groups) for the reading pass.
- Size the spill partitions and the shards from the input size and ``--memory-limit``
  (the memory model is documented in docs/TOKENIZER.md).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from tokenizer.io import InputError, check_columns, file_format, is_stringy, resolve_inputs
from tokenizer.schema import DERIVED_COLUMNS, SchemaConfig, SegmentSpec
from tokenizer.timecols import LocalClock, check_time_type
from tokenizer.window import ReadWindow, read_window, resolve


def _local_start(timezone: str, t: int) -> int:
    """Local wall-clock seconds of UTC second t."""
    return int(LocalClock(timezone, t - 86400, t + 86400)(np.array([t]))[0])


USER = "user"  # the vocabulary namespace of user attributes (vocab/user.<name>.arrow)
KIND_STR, KIND_INT, KIND_FLOAT, KIND_FIXED = "str", "int", "float", "fixed"
_FIXED_DOMAIN = {"@hour": 24, "@weekday": 7}


@dataclass
class AttrPlan:
    """How one attribute's values are read and coded."""

    name: str
    column: str | None  # None for a derived attribute
    kind: str  # str | int | float | fixed (derived or bucketed: values 0..domain-1)
    derived: str | None = None  # "@hour" | "@weekday"
    buckets: list[float] | None = None
    domain: int = 0  # number of values of a fixed attribute
    min_count: int = 1
    max_vocab: int | None = None

    @property
    def value_type(self) -> pa.DataType:
        return {KIND_STR: pa.string(), KIND_FLOAT: pa.float64()}.get(self.kind, pa.int64())


@dataclass
class SegmentPlan:
    """One behaviour segment: where its rows come from and how they are judged and coded."""

    spec: SegmentSpec
    index: int
    source: int  # index into Plan.sources
    user_column: str
    attrs: list[AttrPlan]
    window: tuple[int, int]  # [start, end) UTC epoch seconds; while reading, the range read (tokenizer/window.py)
    window_start_local: int
    timezone: str
    needs_local: bool  # daily rule, day positions (words); derived attributes (reading)
    read: ReadWindow | None = None  # the range the reading pass accepts, and which edges are open
    time_shift: int = 0  # seconds from the reading anchor to the resolved window start (words pass)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def derived(self) -> bool:
        return any(a.derived for a in self.attrs)

    def resolve_window(self, first: int | None, last: int | None) -> None:
        """After the reading pass: the window with open edges taken from the data (tokenizer/window.py);
        the segment's spec then names it, so the manifest records it."""
        rw, spec = self.read, self.spec
        tz = zoneinfo.ZoneInfo(self.timezone)
        given = (None if rw.open_start else rw.lo, None if rw.open_end else rw.hi)
        start, end = resolve(self.name, rw, given, first, last, spec.position_unit, spec.day_start_hour,
                             self.timezone)
        self.window = (start, end)
        self.window_start_local = _local_start(self.timezone, start)
        self.time_shift = rw.lo - start
        for key, t, was_open in (("window_start", start, rw.open_start), ("window_end", end, rw.open_end)):
            if was_open:
                setattr(spec, key, dt.datetime.fromtimestamp(t, tz).replace(tzinfo=None).isoformat())

    def clock(self) -> LocalClock:
        start, end = self.window
        return LocalClock(self.timezone, start - 86400, end + 86400)


@dataclass
class SourcePlan:
    """A set of files read in one pass, feeding one or more segments (or the user table)."""

    files: list[Path]
    columns: list[str]  # projected columns, in read order
    segments: list[int]  # segment indices fed by this source; [] for the user table
    segment_column: str | None = None
    routes: list[tuple[Any, int]] = field(default_factory=list)  # (segment value, segment index)
    dictionary_columns: list[str] = field(default_factory=list)  # Parquet string columns read encoded
    est_rows: list[int] = field(default_factory=list)  # per file

    @property
    def is_users(self) -> bool:
        return not self.segments


@dataclass
class UserPlan:
    source: int
    user_column: str
    attrs: list[AttrPlan]


@dataclass
class Piece:
    """Part of one file: all of it, or Parquet row groups [rg_start, rg_stop)."""

    source: int
    file: int  # index into the source's files
    rg_start: int = 0
    rg_stop: int = -1  # -1: to the end
    row_start: int = 0  # the piece's first row in its file (for error messages)
    est_rows: int = 0


@dataclass
class Plan:
    schema: SchemaConfig
    segments: list[SegmentPlan]
    sources: list[SourcePlan]
    users: UserPlan | None
    user_type: pa.DataType  # int64 or string
    tasks: list[list[Piece]]

    @property
    def est_rows(self) -> int:
        return sum(sum(s.est_rows) for s in self.sources if not s.is_users)

    def segment(self, name: str) -> SegmentPlan:
        return next(s for s in self.segments if s.name == name)


# -- types -------------------------------------------------------------------------------------------
def _base(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def type_family(t: pa.DataType) -> str | None:
    """'str' | 'int' | 'float' | 'null' for the types an attribute may have, else None."""
    t = _base(t)
    if is_stringy(t):
        return KIND_STR
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return KIND_INT
    if pa.types.is_floating(t):
        return KIND_FLOAT
    if pa.types.is_null(t):
        return "null"
    return None


def _attr_kind(spec: Any, files: list[Path], schemas: dict[Path, pa.Schema], where: str) -> str:
    """The coding kind of a read attribute column, the same in every file (or a clear error)."""
    if spec.buckets is not None:
        for f in files:
            fam = type_family(schemas[f].field(spec.column).type)
            if fam not in (KIND_INT, KIND_FLOAT, "null"):
                raise InputError(
                    f"{f}: column {spec.column!r}: bucketed column must be numeric, "
                    f"got {schemas[f].field(spec.column).type}"
                )
        return KIND_FIXED
    kinds: dict[str, Path] = {}
    for f in files:
        t = schemas[f].field(spec.column).type
        fam = type_family(t)
        if fam is None:
            raise InputError(
                f"{f}: column {spec.column!r} ({where}): expected strings, integers or floats, got {t}"
            )
        if fam != "null":
            kinds.setdefault(fam, f)
    if len(kinds) > 1:
        found = "; ".join(f"{k} in {f}" for k, f in kinds.items())
        raise InputError(f"column {spec.column!r} ({where}) has different types across files: {found}")
    return next(iter(kinds), KIND_STR)


def _attr_plans(specs: list[Any], files: list[Path], schemas: dict[Path, pa.Schema], where: str) -> list[AttrPlan]:
    out = []
    for a in specs:
        if a.column in DERIVED_COLUMNS:
            out.append(AttrPlan(a.name, None, KIND_FIXED, derived=a.column, domain=_FIXED_DOMAIN[a.column],
                                min_count=a.min_count, max_vocab=a.max_vocab))
            continue
        kind = _attr_kind(a, files, schemas, f"{where}, attribute {a.name}")
        domain = len(a.buckets) + 1 if a.buckets is not None else 0
        out.append(AttrPlan(a.name, a.column, kind, buckets=a.buckets, domain=domain, min_count=a.min_count,
                            max_vocab=a.max_vocab))
    return out


def _user_family(t: pa.DataType, where: str) -> str:
    base = _base(t)
    if pa.types.is_integer(base):
        return KIND_INT
    if is_stringy(base):
        return KIND_STR
    if pa.types.is_null(base):
        return "null"
    raise InputError(f"{where}: user id column must be integer or string, got {t}")


# -- row estimates -----------------------------------------------------------------------------------
def _csv_rows(path: Path) -> int:
    """Rows of a CSV estimated from its first MB and its (uncompressed) size."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        return 0
    size = os.path.getsize(path)
    if opener is gzip.open:
        with open(path, "rb") as f:  # ISIZE: the uncompressed size mod 2**32, in the last 4 bytes
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
        size = max(isize, len(head))
    lines = head.count(b"\n") or 1
    return max(0, int(size / len(head) * lines) - 1)


def _file_rows(path: Path) -> tuple[int, list[int]]:
    """(rows, rows per Parquet row group) of an input file (estimated for CSV)."""
    fmt = file_format(path)
    if fmt == "parquet":
        md = pq.ParquetFile(path).metadata
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return md.num_rows, groups
    if fmt == "ipc":
        with pa.memory_map(str(path)) as src:
            reader = ipc.open_file(src)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)), []
    return _csv_rows(path), []


# -- the plan ----------------------------------------------------------------------------------------
def plan_inputs(schema: SchemaConfig, task_rows: int | None = None, workers: int = 1) -> Plan:
    """Resolve and check every input (no data is read) and split them into reading tasks.

    ``task_rows`` defaults to about four tasks per worker (load balance, and the granularity of
    resuming), between 256k and 8M rows each.
    """
    seg_plans: list[SegmentPlan] = []
    sources: list[SourcePlan] = []
    source_of: dict[tuple, int] = {}
    user_families: dict[str, Path] = {}
    file_rows: dict[Path, tuple[int, list[int]]] = {}

    for index, (name, spec) in enumerate(schema.segments.items()):
        if name == USER:
            raise InputError(f"segments.{USER}: the name {USER!r} is reserved for user attributes")
        files = resolve_inputs(schema.resolve(spec.path))
        user_col = spec.user_column or schema.data.user_column
        attr_cols = [a.column for a in spec.attributes if a.column not in DERIVED_COLUMNS]
        own = [user_col, spec.time_column, *attr_cols]
        if spec.segment_column:
            own.append(spec.segment_column)
        schemas = check_columns(files, list(dict.fromkeys(own)), f"segment {name}")
        for f, fs in schemas.items():
            fam = _user_family(fs.field(user_col).type, f"{f}: column {user_col!r}")
            if fam != "null":
                user_families.setdefault(fam, f)
            t = fs.field(spec.time_column).type
            if not check_time_type(t):
                raise InputError(
                    f"{f}: column {spec.time_column!r}: time column must be an Arrow timestamp, an integer "
                    f"epoch (see time_unit) or an ISO 8601 string, got {t}"
                )
            if spec.segment_column:
                st = fs.field(spec.segment_column).type
                if type_family(st) not in (KIND_STR, KIND_INT, "null"):
                    raise InputError(f"{f}: column {spec.segment_column!r}: segment column must hold strings or "
                                     f"integers, got {st}")
        attrs = _attr_plans(spec.attributes, files, schemas, f"segment {name}")
        key = (tuple(str(f) for f in files), spec.segment_column) if spec.segment_column else ("own", index)
        if key not in source_of:
            source_of[key] = len(sources)
            sources.append(SourcePlan(files, [], [], spec.segment_column))
        src = sources[source_of[key]]
        if src.segments and seg_plans[src.segments[0]].user_column != user_col:
            raise InputError(f"segments.{name}.user_column: segments that share one table must share its user "
                             f"column ({seg_plans[src.segments[0]].user_column!r} vs {user_col!r})")
        src.segments.append(index)
        src.columns = list(dict.fromkeys([*src.columns, *own]))
        src.dictionary_columns = list(dict.fromkeys(
            [*src.dictionary_columns, *(a.column for a in attrs if a.kind == KIND_STR)]
            + ([spec.segment_column] if spec.segment_column else [])
        ))
        if spec.segment_column:
            for v in spec.segment_values or []:
                taken = [s for val, s in src.routes if val == v]
                if taken:
                    other = seg_plans[taken[0]].name if taken[0] < len(seg_plans) else "?"
                    raise InputError(f"segments.{name}.segment_values: value {v!r} is also claimed by "
                                     f"segment {other!r}")
                src.routes.append((v, index))
        start, end = schema.window_seconds(spec)
        if start is not None and end is not None and end - start >= 2**31:  # int32 seconds from the start
            raise InputError(f"segments.{name}: the window is longer than 68 years")
        rw = read_window(start, end)
        needs_local = spec.word_rule == "daily" or spec.position_unit == "day"
        seg_plans.append(SegmentPlan(spec, index, source_of[key], user_col, attrs, (rw.lo, rw.hi),
                                     _local_start(schema.data.timezone, rw.lo), schema.data.timezone, needs_local,
                                     rw))

    users = None
    if schema.data.users:
        files = resolve_inputs(schema.resolve(schema.data.users))
        user_col = schema.data.user_column
        columns = list(dict.fromkeys([user_col, *(u.column for u in schema.user_attributes)]))
        schemas = check_columns(files, columns, "user table")
        for f, fs in schemas.items():
            fam = _user_family(fs.field(user_col).type, f"{f}: column {user_col!r}")
            if fam != "null":
                user_families.setdefault(fam, f)
        for u in schema.user_attributes:
            if u.column in DERIVED_COLUMNS:
                raise InputError(f"user_attributes.{u.name}: derived columns ({u.column}) are for events only")
        attrs = _attr_plans(list(schema.user_attributes), files, schemas, "user table")
        sources.append(SourcePlan(files, columns, [], None,
                                  dictionary_columns=[a.column for a in attrs if a.kind == KIND_STR]))
        users = UserPlan(len(sources) - 1, user_col, attrs)
    elif schema.user_attributes:
        raise InputError("user_attributes are configured but [data].users names no user table")

    if len(user_families) > 1:
        found = "; ".join(f"{'int64' if t == KIND_INT else 'string'} in {f}" for t, f in user_families.items())
        raise InputError(f"user ids must have one type (integer or string) in every input, found {found}")
    user_type = pa.string() if KIND_STR in user_families else pa.int64()

    for src in sources:
        for f in src.files:
            if f not in file_rows:
                file_rows[f] = _file_rows(f)
        src.est_rows = [file_rows[f][0] for f in src.files]
    if task_rows is None:
        total = sum(sum(s.est_rows) for s in sources)
        task_rows = min(8 << 20, max(1 << 18, total // max(1, 4 * workers)))
    tasks = _make_tasks(sources, file_rows, task_rows)
    return Plan(schema, seg_plans, sources, users, user_type, tasks)


def _make_tasks(sources: list[SourcePlan], file_rows: dict, task_rows: int) -> list[list[Piece]]:
    """Consecutive pieces of about ``task_rows`` rows; a Parquet file splits at row groups."""
    pieces: list[Piece] = []
    for si, src in enumerate(sources):
        for fi, f in enumerate(src.files):
            rows, groups = file_rows[f]
            if len(groups) > 1 and rows > task_rows:
                start, acc, row0 = 0, 0, 0
                for g, n in enumerate(groups):
                    acc += n
                    if acc >= task_rows or g == len(groups) - 1:
                        pieces.append(Piece(si, fi, start, g + 1, row0, acc))
                        row0 += acc
                        start, acc = g + 1, 0
            else:
                pieces.append(Piece(si, fi, 0, -1, 0, rows))
    tasks: list[list[Piece]] = []
    acc = 0
    for p in pieces:
        if not tasks or acc + p.est_rows > task_rows and tasks[-1]:
            tasks.append([])
            acc = 0
        tasks[-1].append(p)
        acc += p.est_rows
    return tasks


def fingerprint(plan: Plan, options: dict[str, Any]) -> str:
    """A digest of everything the output depends on: schema, input files (size, mtime), options."""
    h = hashlib.sha256()
    h.update(json.dumps(plan.schema.to_dict(), sort_keys=True, default=str).encode())
    for src in plan.sources:
        for f in src.files:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(json.dumps([[(p.source, p.file, p.rg_start, p.rg_stop) for p in t] for t in plan.tasks]).encode())
    return h.hexdigest()


# -- memory model ------------------------------------------------------------------------------------
# Bytes of one event in the spill files: time (8), user id (8; strings: 4 + the id's bytes,
# taken as 16 here) and 4 per attribute.
def spill_row_bytes(n_attrs: int, string_ids: bool) -> int:
    return 8 + (20 if string_ids else 8) + 4 * n_attrs


# Working memory of the words pass per spilled event, as a multiple of its spill bytes plus a
# constant: the spilled columns, the user index and sort permutation, sorted times, words and
# the gathered output (measured on the synthetic data; see docs/TOKENIZER.md).
PHASE2_FACTOR = 2.0
PHASE2_EXTRA = 40
RESERVED_BYTES = 320 << 20  # interpreter, numpy/pyarrow/numba, and the reading pass's buffers


def unit_budget(memory_limit: int) -> int:
    """Bytes one unit of the words pass may use (a deterministic function of the limit)."""
    return max(32 << 20, (memory_limit - RESERVED_BYTES) * 3 // 4)


def pow2_at_least(x: float) -> int:
    n = 1
    while n < x:
        n *= 2
    return n


def pow2_nearest(x: float) -> int:
    """The power of two nearest to x in log scale (at least 1)."""
    if x <= 1:
        return 1
    lo = pow2_at_least(x) // 2 if pow2_at_least(x) > x else pow2_at_least(x)
    hi = lo * 2 if lo < x else lo
    return lo if x / lo <= hi / x else hi
