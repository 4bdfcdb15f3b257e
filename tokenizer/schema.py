"""The data schema: which columns hold what, and how actions become behavioural words.

A schema file is TOML (see docs/FORMATS.md and configs/paper.toml)::

    [data]
    users = "users.parquet"
    window_start = "2026-01-01T00:00:00"     # wall-clock time in `timezone`
    window_end = "2026-04-01T00:00:00"
    timezone = "Asia/Tokyo"

    [segments.long]
    path = "long"
    word_rule = "daily"
    position_unit = "day"
    attributes = [ { name = "shop", dim = 48, min_count = 2 }, ... ]

    [[user_attributes]]
    name = "age"
    buckets = [18, 25, 35, 45, 55, 65]

Relative paths are resolved against the schema file's directory.  Everything here is
validated on load: a wrong value is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.typed_config import ConfigError, from_dict, read_toml, to_dict, to_toml

PAD_ID = 0  # padding: never produced for real data, contributes nothing to embeddings
UNK_ID = 1  # unknown: nulls, values below min_count, and values past max_vocab
FIRST_ID = 2  # the most frequent known value

# Attribute columns that are computed from the event time instead of read from a column.
DERIVED_COLUMNS = {"@hour": "hour of day (local time)", "@weekday": "day of week (local time, Monday = 0)"}


@dataclass
class AttributeSpec:
    """One categorical attribute of an action (or a continuous one, bucketed)."""

    name: str
    column: str | None = None  # defaults to `name`; "@hour" / "@weekday" derive it from the event time
    dim: int = 16  # embedding dimension of this attribute
    min_count: int = 1  # values seen fewer times map to UNK_ID
    max_vocab: int | None = None  # cap on vocabulary size, counting the two reserved ids
    buckets: list[float] | None = None  # numeric column -> bucket index by these sorted boundaries

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"name: expected letters, digits and '_', got {self.name!r}")
        if self.column is None:
            self.column = self.name
        if self.column.startswith("@") and self.column not in DERIVED_COLUMNS:
            raise ConfigError(f"{self.name}.column: unknown derived column {self.column!r} "
                              f"(known: {', '.join(DERIVED_COLUMNS)})")
        if self.dim < 1:
            raise ConfigError(f"{self.name}.dim: must be >= 1, got {self.dim}")
        if self.min_count < 1:
            raise ConfigError(f"{self.name}.min_count: must be >= 1, got {self.min_count}")
        if self.max_vocab is not None and self.max_vocab < FIRST_ID + 1:
            raise ConfigError(f"{self.name}.max_vocab: must be >= 3 (two ids are reserved), got {self.max_vocab}")
        _check_buckets(self.buckets, self.name)


@dataclass
class SegmentSpec:
    """A behaviour segment: its input table, its word rule and its attributes."""

    path: str  # file, directory or glob; Parquet, CSV(.gz) or Arrow IPC
    attributes: list[AttributeSpec]
    word_rule: Literal["daily", "session", "action"]  # action: one action = one word (no discretisation)
    position_unit: Literal["day", "hour"]
    user_column: str | None = None  # defaults to [data].user_column
    time_column: str = "ts"
    time_unit: Literal["s", "ms", "us", "ns"] = "s"  # for integer epoch columns
    # One table holding several segments: the rows of this segment are those whose
    # `segment_column` holds one of `segment_values` (default: the segment's name).  Segments
    # with the same path and segment_column are read in one pass.
    segment_column: str | None = None
    segment_values: list[str | int] | None = None
    drop_duplicates: bool = True  # drop repeats of an event (same user, time and attribute values)
    day_start_hour: int = 4  # daily words run from this local hour to the same hour next day
    gap_minutes: float = 30.0  # session words end after an idle gap longer than this
    window_start: str | None = None  # defaults to [data].window_start
    window_end: str | None = None  # defaults to [data].window_end
    max_words: int = 128  # keep the last max_words words of each user
    max_actions_per_word: int = 32  # keep the last actions of a longer word ...
    word_overflow: Literal["cap", "split"] = "cap"  # ... or ("split") cut it into words of that many actions
    name: str = ""  # set from the [segments.<name>] key

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ConfigError("attributes: a segment needs at least one attribute")
        names = [a.name for a in self.attributes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"attributes: duplicate attribute name {sorted(dup)[0]!r}")
        if not 0 <= self.day_start_hour < 24:
            raise ConfigError(f"day_start_hour: must be in 0..23, got {self.day_start_hour}")
        if self.gap_minutes <= 0:
            raise ConfigError(f"gap_minutes: must be > 0, got {self.gap_minutes}")
        if self.max_words < 1:
            raise ConfigError(f"max_words: must be >= 1, got {self.max_words}")
        if self.max_actions_per_word < 1:
            raise ConfigError(f"max_actions_per_word: must be >= 1, got {self.max_actions_per_word}")
        if self.segment_values is not None and self.segment_column is None:
            raise ConfigError("segment_values: needs segment_column (the column that holds them)")
        if self.segment_values is not None and not self.segment_values:
            raise ConfigError("segment_values: must list at least one value")

    @property
    def token_dim(self) -> int:
        """Width of the concatenated attribute embeddings of this segment."""
        return sum(a.dim for a in self.attributes)


@dataclass
class UserAttributeSpec:
    """A per-user attribute, one token each; continuous values are bucketed."""

    name: str
    column: str | None = None
    buckets: list[float] | None = None
    min_count: int = 1
    max_vocab: int | None = None

    def __post_init__(self) -> None:
        if self.column is None:
            self.column = self.name
        if self.min_count < 1:
            raise ConfigError(f"{self.name}.min_count: must be >= 1, got {self.min_count}")
        if self.max_vocab is not None and self.max_vocab < FIRST_ID + 1:
            raise ConfigError(f"{self.name}.max_vocab: must be >= 3, got {self.max_vocab}")
        _check_buckets(self.buckets, self.name)


@dataclass
class DataSpec:
    # ISO wall-clock times in `timezone`, e.g. "2026-01-01T00:00:00".  Either may be left out: the
    # tokenizer then takes it from the data (docs/TOKENIZER.md, "The window").
    window_start: str | None = None
    window_end: str | None = None
    timezone: str = "UTC"
    users: str | None = None  # optional user table (Parquet, CSV or Arrow IPC)
    user_column: str = "user_id"

    def __post_init__(self) -> None:
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"timezone: unknown time zone {self.timezone!r}") from None
        start = parse_time(self.window_start, self.timezone, "window_start") if self.window_start else None
        end = parse_time(self.window_end, self.timezone, "window_end") if self.window_end else None
        if start is not None and end is not None and end <= start:
            raise ConfigError(f"window_end: must be after window_start ({self.window_end} <= {self.window_start})")


@dataclass
class SchemaConfig:
    data: DataSpec
    segments: dict[str, SegmentSpec]
    user_attributes: list[UserAttributeSpec] = field(default_factory=list)
    base_dir: str = "."  # directory that relative paths are resolved against (not read from TOML)

    def __post_init__(self) -> None:
        if not self.segments:
            raise ConfigError("segments: at least one [segments.<name>] table is needed")
        for name, seg in self.segments.items():
            seg.name = name
            if seg.segment_column is not None and seg.segment_values is None:
                seg.segment_values = [name]
            for key in ("window_start", "window_end"):
                value = getattr(seg, key) or getattr(self.data, key)
                setattr(seg, key, value)
                if value is not None:
                    parse_time(value, self.data.timezone, f"segments.{name}.{key}")
            start, end = self.window_seconds(seg)
            if start is not None and end is not None and end <= start:
                raise ConfigError(f"segments.{name}.window_end: must be after window_start")
        names = [u.name for u in self.user_attributes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"user_attributes: duplicate name {sorted(dup)[0]!r}")

    # -- derived values ---------------------------------------------------------------
    def window_seconds(self, seg: SegmentSpec) -> tuple[int | None, int | None]:
        """The segment's window as [start, end) in UTC epoch seconds; None where the schema leaves an
        edge to the data (a tokenized dataset's manifest holds the resolved window)."""
        tz = self.data.timezone
        return (parse_time(seg.window_start, tz, "window_start") if seg.window_start else None,
                parse_time(seg.window_end, tz, "window_end") if seg.window_end else None)

    def num_positions(self, seg: SegmentSpec) -> int:
        """How many position ids the segment's window can produce (the position table size)."""
        start, end = self.window_seconds(seg)
        if start is None or end is None:
            raise ValueError(f"segments.{seg.name}: the window is not resolved yet")
        if seg.position_unit == "hour":
            return (end - start + 3599) // 3600
        # Daily positions count wall-clock 04:00-to-04:00 days, so count them in local time: a window
        # across a DST switch can touch one more day than its length in UTC suggests.
        def day(t: int) -> int:
            local = dt.datetime.fromtimestamp(t, zoneinfo.ZoneInfo(self.data.timezone))
            offset = int(local.utcoffset().total_seconds())
            return (t + offset - seg.day_start_hour * 3600) // 86400

        return day(end - 1) - day(start) + 1

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d.pop("base_dir", None)
        for seg in d["segments"].values():
            seg.pop("name", None)
        return d

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


def _check_buckets(buckets: list[float] | None, name: str) -> None:
    if buckets is not None and any(buckets[i] >= buckets[i + 1] for i in range(len(buckets) - 1)):
        raise ConfigError(f"{name}.buckets: boundaries must be strictly increasing, got {buckets}")


def parse_time(value: str, timezone: str, key: str) -> int:
    """An ISO wall-clock time in ``timezone`` (or with its own offset) -> UTC epoch seconds."""
    try:
        t = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an ISO time like 2026-01-01T00:00:00, got {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=zoneinfo.ZoneInfo(timezone))
    return int(t.timestamp())


def schema_from_dict(data: dict[str, Any], base_dir: str | Path = ".", where: str = "schema") -> SchemaConfig:
    """Build a :class:`SchemaConfig` from the schema tables of a parsed TOML file."""
    keys = {"data", "segments", "user_attributes"}
    schema = from_dict(SchemaConfig, {k: v for k, v in data.items() if k in keys}, where)
    schema.base_dir = str(base_dir)
    return schema


def load_schema(path: str | Path) -> SchemaConfig:
    """Load a schema file; other tables (a full run config's [model] etc.) are ignored here."""
    path = Path(path)
    raw = read_toml(path)
    unknown = set(raw) - {"data", "segments", "user_attributes", "model", "masking", "train", "finetune", "demo"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown top-level table")
    try:
        return schema_from_dict(raw, path.parent, where=str(path.name))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
