"""Files: atomic writing (a temp file beside the target, flushed, fsync'ed, renamed over it, and
the directory fsync'ed so the rename itself survives a power loss), and reading a JSON object.

A crash never leaves a half-written file under a real name.  Every writer of the repository
(shards, manifests, vocabularies, checkpoints, exported models, reports) goes through here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

Write = Callable[[Any], None]  # writes the content into the file-like it is given


class _HashingFile:
    """A write-only file wrapper that hashes what passes through (no second read of the file)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.pos += view.nbytes
        return self.f.write(view)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def atomic_write(path: str | Path, write: Write, durable: bool = True) -> str:
    """Run ``write(file_like)`` into a temp file beside ``path``, fsync, rename; return the sha256.

    ``durable=False`` skips the fsyncs (scratch files: still never seen half-written).
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            hf = _HashingFile(f)
            write(hf)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return hf.sha.hexdigest()


def atomic_write_many(items: Sequence[tuple[str | Path, Write]], durable: bool = True) -> list[str]:
    """Write several small files atomically, syncing them together.

    Each goes to a temp file; the temp files are fsync'ed concurrently (the file system commits
    them in one or two journal transactions instead of one each), then renamed, then their
    directories synced once.  Returns the sha256 of each.
    """
    temps, shas = [], []
    try:
        for path, write in items:
            path = Path(path)
            fd, tmp = _temp_beside(path)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                hf = _HashingFile(f)
                write(hf)
                f.flush()
            shas.append(hf.sha.hexdigest())
        if durable and temps:
            with ThreadPoolExecutor(min(8, len(temps))) as pool:
                list(pool.map(_fsync_path, [t for t, _ in temps]))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        for d in {path.parent for _, path in temps}:
            fsync_dir(d)
    return shas


def atomic_write_bytes(path: str | Path, data: bytes | str, durable: bool = True) -> str:
    """``data`` (text is UTF-8 encoded) into ``path``, atomically; returns the sha256."""
    raw = data.encode() if isinstance(data, str) else data
    return atomic_write(path, lambda f: f.write(raw), durable)


def arrow_file(table: Any) -> Write:
    """A ``write`` for :func:`atomic_write`: ``table`` (a pyarrow Table) as an uncompressed Arrow IPC file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    def write(f: Any) -> None:
        with ipc.new_file(pa.PythonFile(f, mode="w"), table.schema) as writer:
            writer.write_table(table)

    return write


def fsync_dir(d: str | Path) -> None:
    """Make a rename in ``d`` durable (POSIX); not all platforms can open a directory."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | Path, missing: Exception, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in ``path``; raises ``missing`` when there is no such file, ``error`` naming the file
    when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise missing
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return doc


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            sha.update(chunk)
    return sha.hexdigest()
