"""Render pytest-benchmark JSON into markdown tables (for BENCHMARKS.md) and PNG bar charts.

    pytest benchmarks/ --benchmark-only --benchmark-json bench.json
    python benchmarks/render.py bench.json --out docs/bench/render     # writes tables.md and *.png

One table per benchmark file (module), one row per benchmark: name, median and min time, rounds, and
every throughput field found in extra_info (``*_per_s``), then the other extra_info fields.  One PNG per
module that reports ``users_per_s`` (or another ``*_per_s`` field): a horizontal bar per benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from common.atomic import atomic_write, atomic_write_bytes  # noqa: E402

RATE_ORDER = ("users_per_s", "tokens_per_s", "events_per_s", "actions_per_s", "words_per_s", "GB_per_s")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e7:
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return f"{v:.3g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|")


def _module(bench: dict) -> str:
    return Path(bench.get("fullname", bench["name"]).split("::")[0]).stem


def rate_keys(benches: list[dict]) -> list[str]:
    keys = {k for b in benches for k in b.get("extra_info", {}) if k.endswith("_per_s")}
    return [k for k in RATE_ORDER if k in keys] + sorted(keys - set(RATE_ORDER))


def tables(data: dict) -> str:
    """Markdown: a header naming the machine, then one table per module."""
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}) if isinstance(mi.get("cpu"), dict) else {}
    out = [f"Machine: {mi.get('node', '?')}, {cpu.get('brand_raw', mi.get('processor', '?'))}, "
           f"Python {mi.get('python_version', '?')}; run {data.get('datetime', '?')}", ""]
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[_module(b)].append(b)
    for mod, benches in groups.items():
        rates = rate_keys(benches)
        other = sorted({k for b in benches for k in b.get("extra_info", {})} - set(rates))
        cols = ["benchmark", "median (s)", "min (s)", "rounds", *rates, *other]
        out += [f"### {mod}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for b in benches:
            st, ex = b.get("stats") or {}, b.get("extra_info", {})
            row = [b["name"], _fmt(st.get("median")), _fmt(st.get("min")), _fmt(st.get("rounds"))]
            row += [_fmt(ex.get(k)) if k in ex else "" for k in rates + other]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def plots(data: dict, out_dir: Path) -> list[Path]:
    """One bar chart per module with a throughput field; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[_module(b)].append(b)
    written = []
    for mod, benches in groups.items():
        rates = rate_keys(benches)
        if not rates:
            continue
        key = rates[0]
        rows = [(b["name"], float(b["extra_info"][key])) for b in benches if key in b.get("extra_info", {})]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
        ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel(key.replace("_per_s", "/s"))
        ax.set_title(mod)
        for i, (_, v) in enumerate(rows):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{mod}.png"
        atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="pytest --benchmark-json output")
    ap.add_argument("--out", type=Path, default=Path("bench-render"), help="directory for tables.md and PNGs")
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"render: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        print(f"render: {args.json}: expected pytest-benchmark JSON with a 'benchmarks' list", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    md = tables(data)
    atomic_write_bytes(args.out / "tables.md", md)
    pngs = plots(data, args.out)
    print(f"render: wrote {args.out / 'tables.md'} and {len(pngs)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
