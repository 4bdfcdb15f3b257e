"""The compile gate (benchmarks/compile_gate.py, issue 15): every Triton launch the launchers make,
compiled for A100 / H100 / B200 on this CPU, with no compile error, no spill, shared memory within
the target's per-block limit and occupancy above its floor; and the gate catches a bad configuration.

Each test runs the tool in a subprocess: the kernels must be defined as JITFunctions
(TRITON_INTERPRET=0), while this test process defines them for the interpreter.  Compiled
artefacts are cached in the repository's .triton_cache/ (Triton's cache, keyed on source,
specialisation, options and target), so a rerun compiles only what changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernels.dispatch import triton_importable

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "compile_gate.py"

pytestmark = pytest.mark.skipif(not triton_importable(), reason="needs triton (its compiler and ptxas)")


def _env() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".triton_cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _targets() -> list[str]:
    """The gate's targets that this Triton's NVIDIA backend can compile for."""
    code = ("from triton.backends.nvidia.compiler import CUDABackend; from triton.backends.compiler import GPUTarget;"
            "import kernels.targets as t;"
            "print(','.join(n for n, p in t.TARGETS.items() if CUDABackend.supports_target("
            "GPUTarget('cuda', p.capability, 32))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().split(",")


def test_every_launch_compiles_clean_for_every_target(tmp_path):
    targets = _targets()
    assert {"sm_80", "sm_90"} <= set(targets)
    out = tmp_path / "gate.json"
    r = subprocess.run([sys.executable, str(TOOL), "--targets", ",".join(targets), "--json", str(out)],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1500)
    rep = json.loads(out.read_text()) if out.exists() else {}
    assert r.returncode == 0 and rep.get("ok"), "\n".join(rep.get("failures", [])) + r.stderr[-4000:]
    assert not any(rep["case_errors"].values())
    results = rep["results"]
    # every kernel, on every target
    kernels = {"_ce_fwd_kernel", "_ce_bwd_dh_kernel", "_ce_bwd_dw_kernel", "_gcm_fwd_kernel",
               "_gcm_bwd_atomic_kernel", "_gcm_bwd_sorted_kernel"}
    for t in targets:
        assert {r["kernel"] for r in results if r["target"] == t} == kernels, t
    # the fused variants and dtypes the issue lists are among the compiled configurations
    seen = {(r["kernel"], r["config_str"]) for r in results}
    flat = " | ".join(c for _, c in seen)
    for needle in ("HAS_ZERO+HAS_POS+HAS_SEG", "TAB_DTYPE=fp16", "TAB_DTYPE=bf16", "TAB_DTYPE=fp32",
                   "W_DTYPE=fp32 DOT=bf16", "W_DTYPE=fp32 DOT=fp32", "TF32", "W_DTYPE=bf16 DOT=bf16",
                   "W_DTYPE=fp16 DOT=fp16"):
        assert needle in flat, needle
    # gpu_check.py's own calls (its checks, timings and the paper model's training step) all launched:
    # a lent GPU compiles nothing the gate has not compiled
    by_case = {c for r in results for c in r["cases"]}
    gpu_check = [c for c in rep["cases"] if c.startswith("gpu_check")]
    assert len(gpu_check) >= 9 and set(gpu_check) <= by_case
    # only the cases without work launch nothing
    assert set(rep["cases_without_launch"]) <= {c for c in rep["cases"]
                                                 if "M=0" in c or "no words" in c or "torch path" in c}


_BAD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "benchmarks")
    import compile_gate as g
    import kernels.multi_label_ce as mlce

    # the launch the old heuristics made for ieee fp32 at H = 128: 128 x 128 tiles, H resident,
    # 8 warps, 3 stages (issue 15's first row), forced through the launcher's override
    mlce.CONFIG.update(block_m=128, block_v=128, block_k=128, num_warps=8, num_stages=3)
    case = g.Case("bad fp32 forward", lambda: g.ce_call([85124], 128, 10000, g.torch.float32, grads=()))
    rep = g.run_gate(["sm_80"], 1, [case], log=lambda *a: None)
    mlce.CONFIG.update(block_m=None, block_v=None, block_k=None, num_warps=None, num_stages=None)
    # a clean configuration under an occupancy floor it cannot meet
    case2 = g.Case("gather", lambda: g.gather_call([100, 50], [64, 64], 1000, 2.0, g.torch.bfloat16,
                                                   backward=()))
    rep2 = g.run_gate(["sm_90"], 1, [case2], floors={"_gcm_fwd_kernel": 1.01}, log=lambda *a: None)
    print(json.dumps({"bad": rep["failures"], "ok": rep["ok"], "floor": rep2["failures"], "ok2": rep2["ok"],
                      "table": g.markdown(rep)}))
""")


def test_gate_reports_a_bad_configuration():
    r = subprocess.run([sys.executable, "-c", _BAD], capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["ok"] and not res["ok2"]
    bad = " ".join(res["bad"])
    assert "_ce_fwd_kernel" in bad and "on sm_80" in bad
    assert "shared memory 196,608 B > 166,912 B per block" in bad  # 3 stages x 128 x 128 fp32 weight tiles
    assert "spills" in bad
    assert "FAIL" in res["table"]
    assert any("occupancy" in f and "< floor 101.0%" in f for f in res["floor"])
