"""Tokenized output: shard and manifest writing (atomic) and the memory-mapped reader.

Layout and columns are docs/FORMATS.md §4.  Each shard is an Arrow IPC *file* holding one
record batch, one row per user, so that the reader can memory-map it and hand numpy views of
the flat int32 buffers to the data loader without copying or parsing anything.

Every file is written to a temporary name in the same directory, flushed, fsync'ed and then
renamed over the final name, so a crash never leaves a half-written shard or manifest under a
real name.  The manifest is written last; it names every shard with its sha256.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from common.atomic import arrow_file, atomic_write, atomic_write_bytes, atomic_write_many, sha256_file
from tokenizer.vocab import Vocab, vocab_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
VOCAB_DIR = "vocab"
_INT32_MAX = 2**31 - 1


# -- atomic writing (common/atomic.py) -----------------------------------------------------------
# Tests switch this off: they need the temp-file-and-rename atomicity, not durability across a
# power loss, and an fsync costs milliseconds each.
FSYNC = True


def atomic_write_table(path: str | Path, table: pa.Table) -> str:
    """Write ``table`` as an uncompressed Arrow IPC file, atomically; returns its sha256."""
    return atomic_write(path, arrow_file(table), durable=FSYNC)


def atomic_write_tables(items: Sequence[tuple[str | Path, pa.Table]]) -> list[str]:
    """Write several small tables atomically and durably, syncing them together; their sha256s."""
    return atomic_write_many([(path, arrow_file(table)) for path, table in items], durable=FSYNC)


def atomic_write_json(path: str | Path, data: dict[str, Any], durable: bool = True) -> str:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text, durable and FSYNC)


# -- in-memory form -----------------------------------------------------------------------------
@dataclass
class SegmentArrays:
    """One segment's words of N users as flat CSR arrays (FORMATS.md §4, flattened)."""

    name: str
    attributes: list[str]
    user_word_offsets: np.ndarray  # int64 [N+1]
    word_pos: np.ndarray  # int32 [n_words]
    word_len: np.ndarray  # int32 [n_words]
    user_action_offsets: np.ndarray  # int64 [N+1]
    attr_ids: np.ndarray  # int32 [n_actions, K], C-contiguous

    @property
    def num_users(self) -> int:
        return len(self.user_word_offsets) - 1

    def word_offsets(self) -> np.ndarray:
        """int64 [n_words+1]: actions of word w are attr_ids rows word_offsets[w]:[w+1]."""
        out = np.zeros(len(self.word_len) + 1, np.int64)
        np.cumsum(self.word_len, out=out[1:])
        return out

    def slice_users(self, start: int, stop: int) -> SegmentArrays:
        """Users start..stop-1, offsets rebased to 0 (views, no copies of the big arrays)."""
        w0, w1 = self.user_word_offsets[start], self.user_word_offsets[stop]
        a0, a1 = self.user_action_offsets[start], self.user_action_offsets[stop]
        return SegmentArrays(
            self.name,
            self.attributes,
            self.user_word_offsets[start : stop + 1] - w0,
            self.word_pos[w0:w1],
            self.word_len[w0:w1],
            self.user_action_offsets[start : stop + 1] - a0,
            self.attr_ids[a0:a1],
        )


def _list_array(offsets: np.ndarray, values: pa.Array, what: str) -> pa.Array:
    if len(offsets) and offsets[-1] > _INT32_MAX:
        raise ValueError(
            f"{what}: {offsets[-1]} items in one shard exceed list<> int32 offsets; "
            "use fewer users per shard (shard_users)"
        )
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def build_shard_table(
    user_ids: pa.Array,
    user_attr_names: Sequence[str],
    user_attr_ids: np.ndarray,
    segments: Sequence[SegmentArrays],
) -> pa.Table:
    """The shard table of FORMATS.md §4 for these users (all arrays already rebased to them)."""
    cols: dict[str, pa.Array] = {"user_id": user_ids}
    for j, name in enumerate(user_attr_names):
        cols[f"ua.{name}"] = pa.array(np.ascontiguousarray(user_attr_ids[:, j], dtype=np.int32))
    for seg in segments:
        k = len(seg.attributes)
        cols[f"{seg.name}.word_pos"] = _list_array(seg.user_word_offsets, pa.array(seg.word_pos), seg.name)
        cols[f"{seg.name}.word_len"] = _list_array(seg.user_word_offsets, pa.array(seg.word_len), seg.name)
        flat = pa.array(np.ascontiguousarray(seg.attr_ids, dtype=np.int32).reshape(-1))
        rows = pa.FixedSizeListArray.from_arrays(flat, k)
        cols[f"{seg.name}.attr_ids"] = _list_array(seg.user_action_offsets, rows, seg.name)
    return pa.table(cols)


# -- reading ------------------------------------------------------------------------------------
class ManifestError(ValueError):
    """A tokenized directory is missing its manifest, or the manifest is unreadable or unknown."""


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{path}: not found; is {root} the --out directory of `userbert-engine tokenize`?"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: corrupt manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: corrupt manifest (expected a JSON object)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("segments", "user_attributes", "shards"):
        if key not in manifest:
            raise ManifestError(f"{path}: corrupt manifest (no {key!r})")
    return manifest


@dataclass
class TokenizedData:
    """A tokenized directory, memory-mapped: every user's words as flat numpy arrays."""

    root: Path
    manifest: dict[str, Any]
    user_ids: pa.Array  # N, int64 or string: by shard, then ascending within a shard
    user_attr_ids: np.ndarray  # int32 [N, U] (U may be 0)
    segments: list[SegmentArrays]  # in schema order
    _vocabs: dict[tuple[str, str], pa.Array] = field(default_factory=dict, repr=False)
    _id_order: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def segment(self, name: str) -> SegmentArrays:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r} (segments: {', '.join(s.name for s in self.segments)})")

    def vocab(self, segment: str, attribute: str) -> pa.Array:
        """Values by id: element i is the value of id i + 2 ("user" as segment: user attributes)."""
        key = (segment, attribute)
        if key not in self._vocabs:
            self._vocabs[key] = Vocab.load(vocab_file(self.root / VOCAB_DIR, segment, attribute)).values
        return self._vocabs[key]

    def user_index(self, user_ids: Any) -> np.ndarray:
        """int64 row of each raw user id, -1 where unknown."""
        arr = user_ids if isinstance(user_ids, pa.Array | pa.ChunkedArray) else pa.array(user_ids)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if len(arr) == 0 or self.num_users == 0:
            return np.full(len(arr), -1, np.int64)
        try:
            arr = arr.cast(self.user_ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise TypeError(
                f"user ids of type {arr.type} cannot match this data's {self.user_ids.type} ids"
            ) from None
        if pa.types.is_integer(self.user_ids.type) and arr.null_count == 0:
            # Ids ascend within each shard: a binary search over all ids sorted once (cached).
            if self._id_order is None:
                self._id_order = np.argsort(self.user_ids.to_numpy(), kind="stable")
            ids = self.user_ids.to_numpy()[self._id_order]
            q = arr.to_numpy()
            pos = np.minimum(np.searchsorted(ids, q), len(ids) - 1)
            return np.where(ids[pos] == q, self._id_order[pos], -1).astype(np.int64)
        idx = pc.index_in(arr, value_set=self.user_ids)
        return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _segment_from_table(table: pa.Table, name: str, attributes: list[str], where: str) -> SegmentArrays:
    k = len(attributes)
    pos_col = _one_chunk(table, f"{name}.word_pos", where)
    len_col = _one_chunk(table, f"{name}.word_len", where)
    act_col = _one_chunk(table, f"{name}.attr_ids", where)
    offsets = pos_col.offsets.to_numpy().astype(np.int64)
    action_offsets = act_col.offsets.to_numpy().astype(np.int64)
    rows = act_col.flatten()
    if rows.type.list_size != k:
        raise ManifestError(
            f"{where}: {name}.attr_ids has {rows.type.list_size} attributes, manifest says {k}"
        )
    attr = rows.flatten().to_numpy(zero_copy_only=True).reshape(-1, k)
    return SegmentArrays(
        name,
        attributes,
        offsets - offsets[0],
        pos_col.flatten().to_numpy(zero_copy_only=True),
        len_col.flatten().to_numpy(zero_copy_only=True),
        action_offsets - action_offsets[0],
        attr,
    )


def _one_chunk(table: pa.Table, column: str, where: str) -> pa.Array:
    if column not in table.column_names:
        raise ManifestError(f"{where}: column {column!r} missing (columns: {', '.join(table.column_names)})")
    col = table.column(column)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _concat_segments(parts: list[SegmentArrays]) -> SegmentArrays:
    first = parts[0]
    if len(parts) == 1:
        return first

    def offsets(name: str) -> np.ndarray:
        out, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            o = getattr(p, name)
            out.append(o[1:] + base)
            base += o[-1]
        return np.concatenate(out)

    return SegmentArrays(
        first.name,
        first.attributes,
        offsets("user_word_offsets"),
        np.concatenate([p.word_pos for p in parts]),
        np.concatenate([p.word_len for p in parts]),
        offsets("user_action_offsets"),
        np.ascontiguousarray(np.concatenate([p.attr_ids for p in parts])),
    )


def open_tokenized(path: str | Path, verify: bool = False) -> TokenizedData:
    """Open a tokenized directory: memory-map its shards (zero-copy when there is one shard).

    ``verify=True`` checks each shard's sha256 against the manifest first.
    """
    root = Path(path)
    manifest = read_manifest(root)
    seg_meta = manifest["segments"]
    ua_names = list(manifest["user_attributes"].get("names", []))
    ids_parts, ua_parts = [], []
    seg_parts: dict[str, list[SegmentArrays]] = {name: [] for name in seg_meta}
    for entry in manifest["shards"]:
        file = root / entry["file"]
        if not file.is_file():
            raise ManifestError(f"{file}: shard listed in {root / MANIFEST} is missing")
        if verify:
            digest = sha256_file(file)
            if digest != entry.get("sha256"):
                raise ManifestError(
                    f"{file}: sha256 mismatch (file {digest}, manifest {entry.get('sha256')})"
                )
        try:
            table = ipc.open_file(pa.memory_map(str(file))).read_all()
        except pa.ArrowInvalid as e:
            raise ManifestError(f"{file}: not a readable Arrow IPC shard: {e}") from None
        if table.num_rows != entry.get("users", table.num_rows):
            raise ManifestError(f"{file}: {table.num_rows} users, manifest says {entry['users']}")
        ids_parts.append(_one_chunk(table, "user_id", str(file)))
        ua = np.empty((table.num_rows, len(ua_names)), np.int32)
        for j, name in enumerate(ua_names):
            ua[:, j] = _one_chunk(table, f"ua.{name}", str(file)).to_numpy()
        ua_parts.append(ua)
        for name, meta in seg_meta.items():
            seg_parts[name].append(_segment_from_table(table, name, list(meta["attributes"]), str(file)))
    if not ids_parts:
        raise ManifestError(f"{root / MANIFEST}: lists no shards")
    user_ids = ids_parts[0] if len(ids_parts) == 1 else pa.concat_arrays(ids_parts)
    user_attr = ua_parts[0] if len(ua_parts) == 1 else np.concatenate(ua_parts)
    segments = [_concat_segments(parts) for parts in seg_parts.values()]
    return TokenizedData(root, manifest, user_ids, user_attr, segments)
