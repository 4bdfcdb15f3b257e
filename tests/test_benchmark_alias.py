"""`pytest --benchmark` collects exactly what `pytest benchmarks/ --benchmark-only` collects."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return sorted(line for line in r.stdout.splitlines() if "::" in line)


def test_short_form_collects_the_benchmarks_only():
    short = collected("--benchmark")
    assert short and all(line.startswith("benchmarks/") for line in short)
    assert short == collected("benchmarks/", "--benchmark-only")
