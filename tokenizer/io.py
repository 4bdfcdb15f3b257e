"""Reading raw event tables: files, directories and globs of Parquet, CSV(.gz) and Arrow IPC.

The tokenizer never loads a whole input: it streams record batches of the few columns it
needs (projection pushed into the Parquet/CSV/IPC readers) and remembers where each batch came
from (file and row), so that a bad value can be reported as ``events/part-3.parquet: row 1234``.

Time columns are normalised here, once, to int64 UTC epoch seconds (plus local wall-clock
seconds for the schema's time zone, which the daily word rule and ``@hour`` need).  Doing it in
one place keeps the rest of the tokenizer free of units and time zones.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

# Suffix -> reader.  Checked longest first so that ".csv.gz" wins over ".gz".
FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv.gz": "csv",
    ".csv": "csv",
    ".arrow": "ipc",
    ".feather": "ipc",
    ".ipc": "ipc",
}
DEFAULT_BATCH_ROWS = 1 << 18  # 262,144 rows: a few MB per column, large enough to amortise calls
_CSV_BLOCK_BYTES = 8 << 20

_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class InputError(ValueError):
    """An input file is missing, unreadable, lacks a column or holds a mistyped column."""


@dataclass
class Chunk:
    """A record batch of one input file: rows ``row_start .. row_start + len(batch)`` of ``file``."""

    file: Path
    row_start: int  # 0-based data row (CSV header excluded) of the batch's first row in the file
    batch: pa.RecordBatch


def file_format(path: str | Path) -> str:
    """'parquet' | 'csv' | 'ipc' from the file name; an unsupported suffix is an :class:`InputError`."""
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    raise InputError(f"{path}: unsupported input file type (expected one of {', '.join(FORMATS)})")


def _is_input(p: Path) -> bool:
    # Skip Spark/Hadoop marker files (_SUCCESS, .part.crc) that sit beside data files.
    if p.name.startswith((".", "_")) or not p.is_file():
        return False
    try:
        file_format(p)
    except InputError:
        return False
    return True


def resolve_inputs(path: str | Path) -> list[Path]:
    """The input files of ``path``: a file, a directory (searched recursively) or a glob, sorted.

    Sorted order makes the event order, and therefore the stable (user, time) sort and the
    shards, deterministic whatever order the file system lists files in.
    """
    p = Path(path)
    if p.is_file():
        file_format(p)
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _is_input(f))
        if not files:
            raise InputError(f"{p}: directory holds no input files (expected {', '.join(FORMATS)})")
        return files
    if glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if _is_input(Path(f)))
        if not files:
            raise InputError(f"{p}: pattern matches no input files")
        return files
    raise InputError(f"{p}: no such file or directory")


def _csv_options(columns: Sequence[str] | None, block_bytes: int) -> tuple:
    read = pcsv.ReadOptions(block_size=block_bytes)
    # Empty fields are missing values for every column type, strings included.
    convert = pcsv.ConvertOptions(
        include_columns=list(columns) if columns else None, strings_can_be_null=True
    )
    return read, convert


def file_schema(path: Path) -> pa.Schema:
    """The Arrow schema of one input file (CSV types are inferred from its first block)."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt == "ipc":
            with pa.memory_map(str(path)) as src:
                return ipc.open_file(src).schema
        read, convert = _csv_options(None, _CSV_BLOCK_BYTES)
        with pcsv.open_csv(str(path), read_options=read, convert_options=convert) as reader:
            return reader.schema
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


def check_columns(files: Sequence[Path], columns: Sequence[str], what: str) -> dict[Path, pa.Schema]:
    """Fail before any work if a file lacks a column; the error lists the columns it has."""
    schemas = {}
    for f in files:
        schema = file_schema(f)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            have = ", ".join(schema.names)
            raise InputError(f"{f}: column {missing[0]!r} ({what}) not found; the file has columns: {have}")
        schemas[f] = schema
    return schemas


def iter_chunks(
    files: Sequence[Path], columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[Chunk]:
    """Stream ``columns`` (in this order) of every file as batches of at most ``batch_rows`` rows."""
    columns = list(dict.fromkeys(columns))
    for f in files:
        row = 0
        for batch in _file_batches(f, columns, batch_rows):
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, batch_rows):
                piece = batch.slice(start, batch_rows)
                yield Chunk(f, row, piece)
                row += piece.num_rows


def count_rows(files: Sequence[Path]) -> int | None:
    """Total rows from file metadata (for progress bars); None when a CSV makes it unknown."""
    total = 0
    for f in files:
        fmt = file_format(f)
        if fmt == "parquet":
            total += pq.ParquetFile(f).metadata.num_rows
        elif fmt == "ipc":
            with pa.memory_map(str(f)) as src:
                reader = ipc.open_file(src)
                total += sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        else:
            return None
    return total


def _file_batches(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
        elif fmt == "ipc":
            # No context manager: batches may be zero-copy views that outlive this generator.
            reader = ipc.open_file(pa.memory_map(str(path)))
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i).select(columns)
        else:
            read, convert = _csv_options(columns, _CSV_BLOCK_BYTES)
            with pcsv.open_csv(str(path), read_options=read, convert_options=convert) as reader:
                yield from reader
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


# -- column normalisation ---------------------------------------------------------------------
def plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous array with dictionaries decoded and large types narrowed.

    Integers become int64 and strings become utf8, so that the same column read from files of
    different writers (int32 here, int64 there; large_string from Polars) compares equal.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_integer(t) and t != pa.int64():
        arr = arr.cast(pa.int64())
    elif pa.types.is_large_string(t) or pa.types.is_string_view(t):
        arr = arr.cast(pa.string())
    elif pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        arr = arr.cast(pa.binary())
    return arr


def check_user_type(t: pa.DataType, where: str) -> None:
    base = t.value_type if pa.types.is_dictionary(t) else t
    if not (
        pa.types.is_integer(base)
        or pa.types.is_string(base)
        or pa.types.is_large_string(base)
        or pa.types.is_string_view(base)
    ):
        raise InputError(f"{where}: user id column must be integer or string, got {t}")


def check_time_type(t: pa.DataType, where: str) -> None:
    if not (pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise InputError(
            f"{where}: time column must be an Arrow timestamp or an integer epoch (see time_unit), got {t}; "
            "parse strings into timestamps before tokenizing"
        )


def epoch_seconds(arr: pa.Array, time_unit: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64 UTC epoch seconds, bool valid) of a time column.

    Arrow timestamps of any unit count from the UTC epoch whatever their tz (a naive timestamp
    is taken as UTC), so their int64 storage is used directly and ``time_unit`` is ignored;
    integers are epochs in ``time_unit``.  Floats are accepted only when integral (pandas turns
    an int column with nulls into float64).  Sub-second parts are floored.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = plain(arr)
    t = arr.type
    check_time_type(t, where)
    valid = valid_mask(arr)
    if pa.types.is_timestamp(t):
        per_s = _UNIT_PER_SECOND[t.unit]
        raw = arr.cast(pa.int64())
    elif pa.types.is_floating(t):
        per_s = _UNIT_PER_SECOND[time_unit]
        f = arr.fill_null(0).to_numpy(zero_copy_only=False)
        valid &= ~np.isnan(f)
        f = np.where(valid, f, 0)
        if not np.all(f == np.floor(f)) or np.any(np.abs(f) > 2.0**62):
            raise InputError(f"{where}: time column holds non-integral or out-of-range epoch values")
        raw = pa.array(f.astype(np.int64))
    else:
        per_s = _UNIT_PER_SECOND[time_unit]
        raw = arr.cast(pa.int64())
    values = raw.fill_null(0).to_numpy(zero_copy_only=False) if raw.null_count else raw.to_numpy()
    if per_s != 1:
        values = np.floor_divide(values, per_s)
    return values.astype(np.int64, copy=False), valid


def local_seconds(utc_seconds: np.ndarray, timezone: str) -> np.ndarray:
    """Wall-clock seconds in ``timezone`` (``utc + tz_offset(utc)``) as int64, DST included.

    Arrow's ``local_timestamp`` applies the tz database per instant, so the offset is the one in
    force at that instant (summer time in summer), which is what the 04:00 boundary means.
    """
    utc_seconds = np.ascontiguousarray(utc_seconds, dtype=np.int64)
    if timezone in ("UTC", "Etc/UTC", "Z"):
        return utc_seconds.copy()
    ts = pa.array(utc_seconds, type=pa.timestamp("s", tz=timezone))
    return pc.local_timestamp(ts).cast(pa.int64()).to_numpy()


def valid_mask(arr: pa.Array) -> np.ndarray:
    """bool numpy mask of non-null entries (all True without a null bitmap)."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


def read_files(files: Sequence[Path], columns: Sequence[str]) -> tuple[pa.Table, list[tuple[Path, int]]]:
    """Small inputs (a user or label table) read whole; also each file's (path, row count)."""
    columns = list(dict.fromkeys(columns))
    schemas = check_columns(files, columns, "table")
    tables, spans = [], []
    for f in files:
        batches = [c.batch for c in iter_chunks([f], columns)]
        if not batches:
            continue
        t = pa.Table.from_batches(batches)
        tables.append(pa.table({c: plain(t.column(c)) for c in columns}))
        spans.append((f, t.num_rows))
    if not tables:  # keep the column types even when every file is empty
        schema = schemas[files[0]] if files else None
        types = {c: schema.field(c).type if schema else pa.null() for c in columns}
        return pa.table({c: plain(pa.array([], types[c])) for c in columns}), spans
    try:
        return pa.concat_tables(tables), spans
    except pa.ArrowInvalid as e:
        names = ", ".join(map(str, files))
        raise InputError(f"{names}: the files disagree on column types: {e}") from None


def read_table(path: str | Path | Sequence[Path], columns: Sequence[str]) -> pa.Table:
    """``columns`` of a file, directory or glob (or a list of files) as one table.

    Integers come back as int64 and strings as utf8 (see :func:`plain`); a missing column is an
    :class:`InputError` naming the file and listing its columns.
    """
    files = list(path) if isinstance(path, list | tuple) else resolve_inputs(path)
    return read_files([Path(f) for f in files], columns)[0]
