"""The one-screen summary at the end of a tokenize run."""

from __future__ import annotations

from typing import Any

from common.progress import peak_rss_bytes


def _n(x: int | float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def summary(manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    """A one-screen report: inputs, users, per segment words and drops, shards, time and memory."""
    c = manifest["counts"]
    lines = []
    part = manifest.get("part")
    head = f"tokenized {_n(c['users'])} users into {stats.get('out', '?')}"
    if part:
        lo, hi = part["shards"]
        which = f"shards {lo}..{hi - 1}" if hi > lo else "no shards: more jobs than shards"
        head += f"  (part {part['index'] + 1} of {part['of']}: {which})"
    lines.append(head)
    lines.append(f"  events read {_n(c['events_read'])}   unrouted {_n(c.get('events_unrouted', 0))}   "
                 f"user-table rows {_n(c.get('user_rows_read', 0))}")
    w = max(len(s) for s in manifest["segments"]) if manifest["segments"] else 4
    lines.append(f"  {'segment':<{w}}  {'read':>12} {'dropped':>11} {'kept':>12} {'words':>11} "
                 f"{'actions':>12} {'capped':>9} {'truncated':>10}")
    for name in manifest["segments"]:
        s = c[name]
        dropped = sum(manifest["dropped"][name].values())
        lines.append(f"  {name:<{w}}  {_n(s['events_read']):>12} {_n(dropped):>11} {_n(s['events']):>12} "
                     f"{_n(s['words']):>11} {_n(s['actions']):>12} {_n(s['actions_capped']):>9} "
                     f"{_n(s['actions_truncated']):>10}")
    drops = []
    for name, reasons in manifest["dropped"].items():
        nz = {r: v for r, v in reasons.items() if v}
        if nz:
            drops.append(f"{name}: " + ", ".join(f"{r} {_n(v)}" for r, v in nz.items()))
    lines.append("  dropped rows: " + ("; ".join(drops) if drops else "none"))
    n_shards = len(manifest["shards"])
    lines.append(f"  shards {n_shards} (~{_n(c['users'] // max(1, n_shards))} users each)   "
                 f"vocab sizes: " + "; ".join(
                     f"{n}: " + " ".join(str(v) for v in m["vocab_sizes"]) for n, m in manifest["segments"].items()))
    t = stats.get("seconds", {})
    total = sum(t.values())
    rate = c["events_read"] / total if total else 0.0
    lines.append("  time " + "  ".join(f"{k} {v:.1f}s" for k, v in t.items())
                 + f"   total {total:.1f}s = {rate / 1e6:.2f}M events/s")
    extra = []
    if stats.get("resumed_tasks") or stats.get("resumed_units"):
        extra.append(f"resumed: {stats.get('resumed_tasks', 0)} reading tasks, {stats.get('resumed_units', 0)} units")
    extra.append(f"peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB (limit {stats.get('memory_limit', 0) / 2**20:,.0f})")
    extra.append(f"spill {stats.get('spill_bytes', 0) / 2**20:,.0f} MiB in {stats.get('partitions', 0)} partitions")
    lines.append("  " + "   ".join(extra))
    for name, meta in manifest["segments"].items():
        if meta.get("window_from_data"):
            seg = manifest["schema"]["segments"][name]
            lines.append(f"  window of {name} from the data ({', '.join(meta['window_from_data'])}): "
                         f"{seg['window_start']} to {seg['window_end']} ({manifest['schema']['data']['timezone']})")
    lines.extend(f"  WARNING {w}" for w in manifest.get("warnings", []))
    return "\n".join(lines)

