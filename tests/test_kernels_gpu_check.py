"""benchmarks/gpu_check.py --smoke: the GPU script's correctness path, run on CPU in Triton's
interpreter at tiny sizes, in a subprocess (as a user runs it), so CI proves the script works before
anyone spends GPU minutes on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.dispatch import triton_importable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not triton_importable(), reason="needs triton (its CPU interpreter runs the kernels)")
def test_gpu_check_smoke_runs_and_passes(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["checks_ok"] and not res["failed"]
    # every check ran (a section that raised would be None) and is tight in fp32
    assert set(res["checks"]) == {"gather_long", "gather_short", "ce_long", "ce_short"}
    for name, check in res["checks"].items():
        for variant, c in check.items():
            assert c["ok"], (name, variant, c)
            if variant != "bf16_autocast":
                assert c["max_rel_err"] < 1e-5, (name, variant, c)
    for seg in ("long", "short"):
        assert {"triton_atomic", "triton_sorted", "torch", "embedding_bag_cat"} <= set(res["gather"][seg])
        assert {"triton", "torch", "full_logits"} <= set(res["ce"][seg])
    step = res["train_step"]
    assert step["triton"]["first_loss"] == pytest.approx(step["torch"]["first_loss"], rel=2e-2)
    # the table is printed last
    assert r.stdout.strip().splitlines()[-1] == "correctness: all checks passed"
