"""Our tokenizer against the Polars and DuckDB baselines on realistic logs, each as a whole command.

    python benchmarks/tokenizer_vs_baselines.py --events 5000000 --repeat 2
    python benchmarks/tokenizer_vs_baselines.py --events 20000000 --items 1000000 --shops 100000 --repeat 2

Generates logs with tokenizer/synthetic/realistic.py once (under ``--data``; reused while the shape is
the same), runs every tool once untimed (Numba's cache, the page cache, .pyc files), then
``--repeat`` rounds: in each round every tool runs once as a fresh process, in an order rotated
from round to round, timed by the wall clock around the process (start-up, imports, reading,
writing, everything).  The tools:

- ``tokenizer``: ``userbert-engine tokenize --schema S --out DIR --workers W -q`` (its summary
  gives the phase times and its peak RSS);
- ``polars`` / ``duckdb``: ``python benchmarks/baselines_tokenizer.py {polars,duckdb} --schema S
  --out DIR`` (the same words, checked by benchmarks/test_tokenizer_baselines.py).

``--tools`` takes any of these, and ``polars:ARGS`` / ``duckdb:ARGS`` for a variant with extra
arguments of baselines_tokenizer.py (``"polars:--engine streaming --categorical"``).
Peak RSS is each process's own VmHWM.  Prints a markdown table (``--json FILE`` keeps every run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = Path(__file__).resolve().parent / "baselines_tokenizer.py"
DEFAULT_TOOLS = ("tokenizer", "polars", "duckdb")


def realistic_data(root: Path, events: int, items: int = 100_000, shops: int = 10_000, seed: int = 0) -> Path:
    """The schema of realistic logs of this shape under ``root`` (written unless already there)."""
    sys.path.insert(0, str(ROOT))
    from tokenizer.synthetic.realistic import LogShape, write_logs

    shape = LogShape(events=events, items=items, shops=shops, seed=seed)
    marker = root / "SHAPE.json"
    if marker.exists() and (root / "schema.toml").exists():
        have = json.loads(marker.read_text())
        if all(have.get(k) == v for k, v in (("events", events), ("items", items), ("shops", shops), ("seed", seed))):
            return root / "schema.toml"
    shutil.rmtree(root, ignore_errors=True)
    write_logs(root, shape)
    return root / "schema.toml"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def command(tool: str, schema: Path, out: Path, workers: int = 2) -> list[str]:
    name, _, extra = tool.partition(":")
    if name == "tokenizer":
        exe = Path(sys.executable).with_name("userbert-engine")
        head = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]
        return [*head, "tokenize", "--schema", str(schema), "--out", str(out), "--workers", str(workers), "-q",
                *shlex.split(extra)]
    if name in ("polars", "duckdb", "pandas"):
        return [sys.executable, str(BASELINES), name, "--schema", str(schema), "--out", str(out), *shlex.split(extra)]
    raise ValueError(f"unknown tool {tool!r}")


_TOK_TIME = re.compile(r"time (.*?)\s+total ([\d.]+)s")
_TOK_RSS = re.compile(r"peak RSS ([\d,]+) MiB")


def run_tool(tool: str, schema: Path, out: Path, workers: int = 2, env: dict[str, str] | None = None) -> dict:
    """One run as a fresh process: wall seconds, CPU seconds (user + system, all threads), the
    process's peak RSS and, for the tokenizer, its phase times.  ``out`` is emptied first (untimed)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(tool, schema, out, workers)
    load = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), cwd=ROOT)
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{tool}: exit {done.returncode}\n{done.stderr[-4000:]}")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    rec = {"tool": tool, "wall_s": wall, "cpu_s": cpu, "loadavg": load}
    if tool.partition(":")[0] == "tokenizer":
        m = _TOK_RSS.search(done.stderr)
        rec["peak_rss_mib"] = int(m.group(1).replace(",", "")) if m else None
        m = _TOK_TIME.search(done.stderr)
        rec["phases"] = f"{m.group(1).strip()}  total {m.group(2)}s" if m else None
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        rec["words"] = {s: counts[s]["words"] for s in counts if isinstance(counts[s], dict)}
    else:
        line = json.loads(done.stdout.strip().splitlines()[-1])
        rec["peak_rss_mib"] = line["peak_rss"] >> 20
        rec["words"] = line["words"]
    return rec


def compare(schema: Path, tools: list[str], repeat: int, work: Path, workers: int = 2, warm: bool = True,
            log=print) -> list[dict]:
    """Every tool ``repeat`` times, interleaved (order rotated each round), after one untimed warm run."""
    runs = []
    if warm:
        for tool in tools:
            rec = run_tool(tool, schema, work / "out", workers)
            log(f"warm-up {tool}: {rec['wall_s']:.1f}s")
    for r in range(repeat):
        order = tools[r % len(tools):] + tools[: r % len(tools)]
        for tool in order:
            rec = run_tool(tool, schema, work / "out", workers)
            rec["round"] = r
            if runs and rec["words"] != runs[0]["words"]:
                raise RuntimeError(f"{tool} made {rec['words']} words, {runs[0]['tool']} {runs[0]['words']}")
            runs.append(rec)
            log(f"round {r + 1} {tool}: {rec['wall_s']:.1f}s (cpu {rec['cpu_s']:.1f}s), {rec['peak_rss_mib']} MiB, "
                f"load {rec['loadavg']:.1f}"
                + (f"  [{rec['phases']}]" if rec.get("phases") else ""))
    shutil.rmtree(work / "out", ignore_errors=True)
    return runs


def table(runs: list[dict], events: int) -> str:
    """Markdown: per tool its wall time range, best events/s and peak RSS; then our speed-up over
    the faster baseline, per round (a range) and best against best."""
    tools = list(dict.fromkeys(r["tool"] for r in runs))
    lines = ["| events | tool | wall s (min-max) | events/s (best) | CPU s (min-max) | peak RSS MiB (max) | runs |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    best = {}
    for tool in tools:
        w = [r["wall_s"] for r in runs if r["tool"] == tool]
        rss = [r["peak_rss_mib"] for r in runs if r["tool"] == tool and r["peak_rss_mib"] is not None]
        cpu = [r["cpu_s"] for r in runs if r["tool"] == tool]
        best[tool] = min(w)
        lines.append(f"| {events:,} | {tool} | {min(w):.1f}-{max(w):.1f} | {events / min(w) / 1e6:.2f}M | "
                     f"{min(cpu):.1f}-{max(cpu):.1f} | {max(rss) if rss else '-'} | {len(w)} |")
    ours = [t for t in tools if t.startswith("tokenizer")]
    others = [t for t in tools if not t.startswith("tokenizer")]
    if ours and others:
        t = ours[0]
        per_round = []
        for r in sorted({x["round"] for x in runs}):
            row = {x["tool"]: x["wall_s"] for x in runs if x["round"] == r}
            if t in row and any(o in row for o in others):
                per_round.append(min(row[o] for o in others if o in row) / row[t])
        fastest = min(others, key=best.get)
        lines.append("")
        lines.append(f"ours / faster of the baselines ({fastest}, by best time): "
                     f"{best[fastest] / best[t]:.2f}x events/s; per round: "
                     + ", ".join(f"{x:.2f}x" for x in per_round))
    phases = [r["phases"] for r in runs if r.get("phases")]
    if phases:
        lines.append("tokenizer phases (in-process): " + "; ".join(phases))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--shops", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=None, help="where the logs live (default: /tmp/userbert-realistic/...)")
    p.add_argument("--work", type=Path, default=None, help="output directory of the runs (default: beside --data)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of interleaved runs")
    p.add_argument("--tools", nargs="+", default=list(DEFAULT_TOOLS))
    p.add_argument("--workers", type=int, default=2, help="tokenizer --workers")
    p.add_argument("--no-warm", action="store_true", help="skip the untimed first run of each tool")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    args = p.parse_args(argv)
    data = args.data or Path("/tmp/userbert-realistic") / f"ev{args.events}-it{args.items}-sh{args.shops}-s{args.seed}"
    t = time.perf_counter()
    schema = realistic_data(data, args.events, args.items, args.shops, args.seed)
    print(f"data: {data} ({time.perf_counter() - t:.0f}s); cpus {os.cpu_count()}", file=sys.stderr)
    work = args.work or data.parent / (data.name + "-runs")
    runs = compare(schema, args.tools, args.repeat, work, args.workers, warm=not args.no_warm,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    for r in runs:
        r["events"] = args.events
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    print(table(runs, args.events))


if __name__ == "__main__":
    main()
