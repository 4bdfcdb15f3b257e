"""benchmarks/render.py on a small hand-made pytest-benchmark JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "render.py"

DATA = {
    "machine_info": {"node": "box", "cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11.7"},
    "datetime": "2026-11-28T00:00:00",
    "benchmarks": [
        {"name": "test_train_step_cpu[ours]", "fullname": "benchmarks/test_train_step.py::test_train_step_cpu[ours]",
         "stats": {"median": 2.5, "min": 2.25, "rounds": 2},
         "extra_info": {"provider": "ours", "users_per_s": 819.2, "tokens_per_s": 20000.0}},
        {"name": "test_train_step_cpu[plain]", "fullname": "benchmarks/test_train_step.py::test_train_step_cpu[plain]",
         "stats": {"median": 40.0, "min": 39.0, "rounds": 2},
         "extra_info": {"provider": "plain", "users_per_s": 12.8}},
        {"name": "test_collate_one_core[synth]", "fullname": "benchmarks/test_loader.py::test_collate_one_core[synth]",
         "stats": {"median": 0.1, "min": 0.09, "rounds": 5}, "extra_info": {"dataset": "synth"}},
    ],
}


def test_render_writes_tables_and_plots(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(DATA))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    md = (out / "tables.md").read_text()
    assert "Test CPU" in md and "### test_train_step" in md and "### test_loader" in md
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| benchmark") and "users_per_s" in line)
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:6] == ["benchmark", "median (s)", "min (s)", "rounds", "users_per_s", "tokens_per_s"]
    ours = next(line for line in lines if line.startswith("| test_train_step_cpu[ours]"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[1:6] == ["2.5", "2.25", "2", "819", "20,000"]
    plain = next(line for line in lines if line.startswith("| test_train_step_cpu[plain]"))
    assert [c.strip() for c in plain.strip("|").split("|")][4:6] == ["12.8", ""]  # missing field: empty cell
    # a plot for the module with throughputs, none for the one without
    png = out / "test_train_step.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "test_loader.png").exists()


def test_render_rejects_other_json(tmp_path):
    src = tmp_path / "x.json"
    src.write_text(json.dumps({"hello": 1}))
    r = subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "benchmarks" in r.stderr
