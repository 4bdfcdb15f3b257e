"""DeepSpeed on CPU (gloo, bf16) with two processes, under both launchers, as users run it:

- `deepspeed --num_gpus 2 cli/pretrain.py` at ZeRO 2 with gradient accumulation: the loss decreases (the reference)
- `torchrun --nproc_per_node 2` with the same config, stopped by SIGTERM part-way: it writes a checkpoint and
  exits; `torchrun ... --resume` finishes it, and the loss sequence and final weights equal the reference's
  (the launcher makes no difference)
- `torchrun` at ZeRO 0 with a loader thread per rank: the loss decreases
- `userbert-engine pretrain --deepspeed_config ...`: one process, its own gloo group

DeepSpeed's shared-memory comm op is never built (engine/train/backends.py keeps it out on CPU), so no run waits ~30 s
for a compiler.  Each run starts fresh Python processes: most of the time here is imports and DeepSpeed's setup.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.synthetic import generate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / "cli" / "pretrain.py")
DS = ROOT / "configs" / "ds"
STEPS = 30
TINY = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.dropout=0.1", "model.attn_dropout=0.1",
        "train.batch_size=16", "train.lr=3e-3", "train.device=\"cpu\"", "train.log_every=1", "train.num_threads=1"]
ZERO2 = [*TINY, "train.micro_batch_size=4", "train.warmup_steps=4"]  # 4 users x 2 accumulation x 2 ranks


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_multiproc")
    generate(root / "raw", 300, seed=4, n_genres=40, n_shops=100, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", shard_users=120, progress=False)
    return root / "tok"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed(*args: str) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), CLI, *args]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", CLI, *args]


def _run(cmd: list[str], log: Path, timeout: float = 240) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, timeout=timeout).returncode


def _args(tok: Path, out: Path, ds: str, sets: list[str], *extra: str) -> list[str]:
    return ["--data", str(tok), "--out", str(out), "--deepspeed_config", str(DS / ds), "--steps", str(STEPS), "-q",
            *extra, "--set", *sets]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _decreases(rows: list[dict]) -> bool:
    losses = np.array([r["step_loss"] for r in rows])
    return bool(np.isfinite(losses).all() and losses[-5:].mean() < 0.9 * losses[:5].mean())


@pytest.fixture(scope="module")
def reference(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    rc = _run(_deepspeed(*_args(tok, out, "zero2_bf16.json", ZERO2)), out.parent / "log")
    assert rc == 0, (out.parent / "log").read_text()[-3000:]
    return out


def test_deepspeed_launcher_zero2_loss_decreases(reference):
    rows = _metrics(reference)
    assert [r["step"] for r in rows] == list(range(STEPS)) and _decreases(rows)
    assert {"grad_norm", "lr", "tokens_per_s", "data_wait_s", "mem/rss_mb", "loss/long.shop"} <= set(rows[-1])
    assert rows[0]["lr"] == pytest.approx(3e-3 / 4)  # warmup from the run config
    ds = json.loads((reference / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 2
    desc = json.loads((reference / "model" / "model.json").read_text())
    assert desc["meta"] | {"world_size": 2, "backend": "deepspeed", "precision": "bf16"} == desc["meta"]
    weights = load_file(reference / "model" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights, not the bf16 copies
    assert (reference / "loss.png").exists() and any((reference / "tensorboard").iterdir())


def test_sigterm_then_resume_is_exact(tok, tmp_path, reference):
    out = tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun(*_args(tok, out, "zero2_bf16.json", ZERO2)), stdout=f,
                                stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                metrics = out / "metrics.jsonl"
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
                    break
                time.sleep(0.05)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc != 0 and "stopped by SIGTERM" in text, text[-3000:]
    stopped = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(stopped) == 1 and (stopped[0] / "trainer_state.json").exists()  # no periodic ones: the signal's
    k = json.loads((stopped[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= k < STEPS and not (out / "model").exists()

    rc = _run(_torchrun(*_args(tok, out, "zero2_bf16.json", ZERO2, "--resume")), tmp_path / "log2")
    assert rc == 0, (tmp_path / "log2").read_text()[-3000:]
    assert f"resumed from {stopped[0]}" in (tmp_path / "log2").read_text()
    got, want = _metrics(out), _metrics(reference)
    assert [r["step"] for r in got] == list(range(STEPS))
    assert [r["step_loss"] for r in got] == [r["step_loss"] for r in want]
    a, b = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_torchrun_zero0_with_loader_workers_loss_decreases(tok, tmp_path):
    out = tmp_path / "run"
    rc = _run(_torchrun(*_args(tok, out, "zero0_bf16.json", [*TINY, "train.loader_workers=1"])), tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    rows = _metrics(out)
    assert len(rows) == STEPS and _decreases(rows)
    assert "1 loader threads" in (tmp_path / "log").read_text()


def test_single_process_deepspeed_has_its_own_group(tok, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli.main", "pretrain", *_args(tok, out, "zero1_bf16_warmup_linear.json",
                                                                 [*TINY, "train.warmup_steps=2"])]
    rc = _run(cmd, tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()[-3000:]
    rows = _metrics(out)
    assert _decreases(rows) and rows[-1]["lr"] < rows[5]["lr"]  # linear decay from the JSON's scheduler
    assert json.loads((out / "config.json").read_text())["train"]["schedule"] == "linear"
