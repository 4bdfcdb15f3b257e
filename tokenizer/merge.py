"""Joining the parts of a ``--num-shards K`` run into one tokenized directory.

Each job ``i`` writes the shards of its user-hash range, the (identical) vocabularies, and
``parts/part-<i>-of-<K>.json``: a manifest of its own users and rows.  Once every part is
there, :func:`merge_parts` checks that they belong together (same schema, vocabularies and
shard layout, shard ranges that tile the whole hash space), adds their counts and writes
``manifest.json``: the same manifest, byte for byte, as one run over all the input.

Jobs on machines without a shared file system write to separate directories; passing those
directories copies their shards and parts into the output first.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path
from typing import Any

from common.atomic import sha256_file
from tokenizer.manifest import check_accounting
from tokenizer.pipeline import PARTS_DIR
from tokenizer.shards import MANIFEST, SHARD_DIR, VOCAB_DIR, atomic_write_json

_PART = re.compile(r"part-(\d{5})-of-(\d{5})\.json$")


class MergeError(ValueError):
    """The parts are missing, do not belong together, or do not add up."""


def _gather(out: Path, part_dirs: list[Path]) -> None:
    """Copy shards, vocabularies and part manifests of other job directories into ``out``."""
    for d in part_dirs:
        if not (d / PARTS_DIR).is_dir():
            raise MergeError(f"{d}: no {PARTS_DIR}/ directory (is it the --out of a --num-shards job?)")
        for sub in (SHARD_DIR, VOCAB_DIR, PARTS_DIR):
            if not (d / sub).is_dir():
                continue
            (out / sub).mkdir(parents=True, exist_ok=True)
            for f in sorted((d / sub).iterdir()):
                if f.name.startswith("."):
                    continue
                dest = out / sub / f.name
                if sub == VOCAB_DIR and dest.exists():
                    if not filecmp.cmp(f, dest, shallow=False):
                        raise MergeError(f"{f}: differs from {dest}: the jobs built different vocabularies "
                                         "(build one with a first run and pass it to every job with --vocab)")
                    continue
                shutil.copy2(f, dest)


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add(a[k], b.get(k, 0)) for k in a}
    return a + b


def merge_parts(out_dir: str | Path, part_dirs: list[str | Path] = (), verify: bool = False) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` from the parts of a ``--num-shards`` run; returns it."""
    out = Path(out_dir)
    _gather(out, [Path(d) for d in part_dirs])
    files = sorted((out / PARTS_DIR).glob("part-*-of-*.json")) if (out / PARTS_DIR).is_dir() else []
    if not files:
        raise MergeError(f"{out / PARTS_DIR}: no part manifests (part-<i>-of-<K>.json) found")
    parts: dict[int, dict[str, Any]] = {}
    of = set()
    for f in files:
        m = _PART.search(f.name)
        if not m:
            continue
        parts[int(m.group(1))] = json.loads(f.read_text())
        of.add(int(m.group(2)))
    if len(of) != 1:
        raise MergeError(f"{out / PARTS_DIR}: parts of runs with different --num-shards: {sorted(of)}")
    k = of.pop()
    missing = [i for i in range(k) if i not in parts]
    if missing:
        raise MergeError(f"{out / PARTS_DIR}: {len(missing)} of {k} parts missing (e.g. --shard-index {missing[0]})")
    first = parts[0]
    bits = first["part"]["shard_bits"]
    stop = 0
    for i in range(k):
        p = parts[i]
        for key in ("format_version", "schema", "user_attributes", "sharding"):
            if p[key] != first[key]:
                raise MergeError(f"part {i} of {k}: {key!r} differs from part 0: not the same run")
        for name, meta in p["segments"].items():
            other = first["segments"][name]
            if {k_: v for k_, v in meta.items() if k_ != "num_positions"} != {
                k_: v for k_, v in other.items() if k_ != "num_positions"
            }:
                raise MergeError(f"part {i} of {k}: segment {name!r} differs from part 0 (vocabularies?)")
        lo, hi = p["part"]["shards"]
        if p["part"]["shard_bits"] != bits or lo != stop:
            raise MergeError(f"part {i} of {k}: covers shards {lo}..{hi - 1}, expected to start at {stop}")
        stop = hi
    if stop != 1 << bits:
        raise MergeError(f"the parts cover shards 0..{stop - 1} of {1 << bits}")
    counts, dropped = first["counts"], first["dropped"]
    segments = {name: dict(meta) for name, meta in first["segments"].items()}
    shards = list(first["shards"])
    for i in range(1, k):
        p = parts[i]
        counts = _add(counts, p["counts"])
        dropped = _add(dropped, p["dropped"])
        shards += p["shards"]
        for name, meta in p["segments"].items():
            segments[name]["num_positions"] = max(segments[name]["num_positions"], meta["num_positions"])
    shards.sort(key=lambda s: s["file"])
    for s in shards:
        f = out / s["file"]
        if not f.is_file():
            raise MergeError(f"{f}: shard listed in a part manifest is missing")
        if verify and sha256_file(f) != s["sha256"]:
            raise MergeError(f"{f}: sha256 does not match its part manifest")
    manifest = {key: first[key] for key in first if key != "part"}
    manifest.update({"segments": segments, "counts": counts, "dropped": dropped, "shards": shards})
    bad = check_accounting(manifest)
    if bad:
        raise MergeError("the parts do not add up: " + "; ".join(bad))
    atomic_write_json(out / MANIFEST, manifest)
    keep = {Path(s["file"]).name for s in shards}
    for old in (out / SHARD_DIR).glob("shard-*.arrow"):
        if old.name not in keep:
            old.unlink()
    return manifest
