"""The tokenized directory's manifest: built from the reading tasks' and units' results, and checked."""

from __future__ import annotations

import warnings
from typing import Any

from tokenizer.plan import USER, Plan
from tokenizer.reader import REASONS, USER_REASONS
from tokenizer.schema import SchemaConfig
from tokenizer.shards import FORMAT_VERSION
from tokenizer.vocab import Vocab


def build_manifest(
    plan: Plan, schema: SchemaConfig, results: list[dict[str, Any]], units: list[dict[str, Any]],
    vocabs: dict[int, list[Vocab]], shard_bits: int, shard_users: int,
) -> dict[str, Any]:
    """manifest.json: the schema, vocabulary sizes, counts (read, dropped by reason, kept) and shards."""
    seg_meta: dict[str, Any] = {}
    counts: dict[str, Any] = {"users": sum(u["users"] for u in units)}
    dropped: dict[str, dict[str, int]] = {}
    events_read = 0
    for seg in plan.segments:
        name = seg.name
        read = sum(r["streams"][seg.index]["rows"] for r in results)
        events_read += read
        d = {r: sum(res["streams"][seg.index]["dropped"].get(r, 0) for res in results) for r in REASONS}
        d["duplicate"] = sum(u["segments"][name]["duplicates"] for u in units)
        dropped[name] = d
        c = {"events_read": read}
        for key in ("events", "words", "actions", "words_truncated", "actions_capped", "actions_truncated"):
            c[key] = sum(u["segments"][name][key] for u in units)
        counts[name] = c
        max_pos = max((u["max_pos"][name] for u in units), default=-1)
        num_positions = schema.num_positions(seg.spec)
        if max_pos >= num_positions:
            # Only a window edge across a DST change can do this; keep the table large enough.
            warnings.warn(f"segment {name}: position {max_pos} >= num_positions {num_positions}; "
                          "num_positions raised to fit", stacklevel=3)
            num_positions = max_pos + 1
        seg_meta[name] = {
            "attributes": [a.name for a in seg.attrs],
            "vocab_sizes": [v.size for v in vocabs[seg.index]],
            "dims": [a.dim for a in seg.spec.attributes],
            "num_positions": num_positions,
            "max_words": seg.spec.max_words,
        }
        if seg.read is not None and seg.read.is_open:  # edges the schema left out, taken from the data
            seg_meta[name]["window_from_data"] = [k for k, o in (("window_start", seg.read.open_start),
                                                                 ("window_end", seg.read.open_end)) if o]
    unrouted = sum(n for r in results for n in r["unrouted"].values())
    counts["events_read"] = events_read + unrouted
    counts["events_unrouted"] = unrouted
    user_vocabs: list[Vocab] = []
    if plan.users is not None:
        stream = len(plan.segments)
        user_vocabs = vocabs[stream]
        counts["user_rows_read"] = sum(r["streams"][stream]["rows"] for r in results)
        counts["user_rows"] = sum(u["user_rows"] for u in units)
        d = {r: sum(res["streams"][stream]["dropped"].get(r, 0) for res in results) for r in USER_REASONS}
        d["duplicate_user"] = sum(u["duplicate_users"] for u in units)
        dropped[USER] = d
    shards = [s for u in units for s in u["shards"]]
    shards.sort(key=lambda s: s["file"])
    return {
        "format_version": FORMAT_VERSION,
        "schema": schema.to_dict(),
        "segments": seg_meta,
        "user_attributes": {
            "names": [u.name for u in schema.user_attributes],
            "vocab_sizes": [v.size for v in user_vocabs],
        },
        "counts": counts,
        "dropped": dropped,
        "sharding": {"hash": "fmix64", "shard_bits": shard_bits, "shard_users": shard_users},
        "shards": shards,
    }


def check_accounting(manifest: dict[str, Any]) -> list[str]:
    """The identities that make sure nothing is silently lost; returns the ones that fail."""
    c, d = manifest["counts"], manifest["dropped"]
    bad = []
    total = c.get("events_unrouted", 0)
    for name in manifest["segments"]:
        s = c[name]
        total += s["events_read"]
        if s["events_read"] != sum(d[name].values()) + s["events"]:
            bad.append(f"{name}: events_read != dropped + events")
        if s["events"] != s["actions"] + s["actions_capped"] + s["actions_truncated"]:
            bad.append(f"{name}: events != actions + actions_capped + actions_truncated")
    if total != c["events_read"]:
        bad.append("events_read != sum of segments' events_read + events_unrouted")
    if USER in d and c.get("user_rows_read", 0) != sum(d[USER].values()) + c.get("user_rows", 0):
        bad.append("user_rows_read != dropped + user_rows")
    if sum(s["users"] for s in manifest["shards"]) != c["users"]:
        bad.append("users in shards != counts.users")
    return bad
