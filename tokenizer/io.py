"""Reading raw tables: files, directories and globs of Parquet, CSV(.gz) and Arrow IPC.

The tokenizer never loads a whole input: it streams record batches of the few columns it
needs (projection pushed into the Parquet/CSV/IPC readers; Parquet string columns decoded
as dictionaries) and remembers where each batch came from (file and row), so that a bad value
can be reported as ``events/part-3.parquet: row 1234``.  Time columns are normalised in
tokenizer/timecols.py.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
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



class InputError(ValueError):
    """An input file is missing, unreadable, lacks a column or holds a mistyped column."""


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
    # Empty fields are missing values for every column type, strings included.  UTF-8 is
    # checked by the tokenizer per value (a bad value is a bad row), not by the reader (which
    # would turn the whole column into binary).
    convert = pcsv.ConvertOptions(
        include_columns=list(columns) if columns else None, strings_can_be_null=True, check_utf8=False
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


# Parquet column chunks are streamed through buffers of this size instead of read whole: a row group of
# a wide, uncompressed file would otherwise hold its full column chunks in memory per reading worker.
PARQUET_BUFFER = 8 << 20


def iter_piece(
    path: Path,
    columns: Sequence[str],
    *,
    rg_start: int = 0,
    rg_stop: int = -1,
    row_start: int = 0,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    dictionary_columns: Sequence[str] = (),
    use_threads: bool = True,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row in the file, batch) of ``columns`` of a file or of Parquet row groups [rg_start, rg_stop).

    String columns named in ``dictionary_columns`` are read dictionary-encoded from Parquet when the
    file stores them with dictionary pages: those are decoded once instead of materialising a string
    per row.  A column stored plain is read plain: asking Arrow for a dictionary there makes it hash
    every value to build one (measured: +0.16 s per 2.5M-row high-cardinality column), which the
    coder does anyway (tokenizer/coders.py).
    """
    columns = list(dict.fromkeys(columns))
    fmt = file_format(path)
    row = row_start
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER)
            fields = {f.name: f.type for f in pf.schema_arrow}
            as_dict = [c for c in dictionary_columns if c in fields and is_stringy(fields[c])]
            if as_dict and pf.metadata.num_row_groups:
                rg = pf.metadata.row_group(max(0, rg_start))
                paged = {rg.column(i).path_in_schema for i in range(rg.num_columns)
                         if rg.column(i).has_dictionary_page}
                as_dict = [c for c in as_dict if c in paged]
            if as_dict:
                pf = pq.ParquetFile(path, read_dictionary=as_dict, buffer_size=PARQUET_BUFFER)
            stop = pf.metadata.num_row_groups if rg_stop < 0 else rg_stop
            if stop <= rg_start:
                return
            batches = pf.iter_batches(
                batch_size=batch_rows, row_groups=range(rg_start, stop), columns=columns, use_threads=use_threads
            )
        else:
            batches = _file_batches(path, columns, batch_rows)
        for batch in batches:
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, batch_rows):
                piece = batch.slice(start, batch_rows)
                yield row, piece
                row += piece.num_rows
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


def is_stringy(t: pa.DataType) -> bool:
    """String or binary values, in any layout (large, view) and dictionary-encoded or not."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
    )


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


def read_files(files: Sequence[Path], columns: Sequence[str]) -> tuple[pa.Table, list[tuple[Path, int]]]:
    """Small inputs (a label table) read whole; also each file's (path, row count)."""
    columns = list(dict.fromkeys(columns))
    schemas = check_columns(files, columns, "table")
    tables, spans = [], []
    for f in files:
        batches = [b for _, b in iter_piece(f, columns)]
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
