"""Training telemetry: JSONL metrics, TensorBoard scalars, memory, a progress bar and a loss-curve PNG.

Only rank 0 writes (``enabled=False`` elsewhere).  A resumed run passes ``start_step``: records at or
after it (written by the interrupted run after its last checkpoint) are dropped from metrics.jsonl
and purged from TensorBoard, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_bytes
from common.progress import Bar, peak_rss_bytes


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the numbers to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True,
                 start_step: int | None = None):
        """``start_step``: None appends (the old behaviour); 0 starts the files afresh; k > 0 keeps the
        records of steps < k (a run resumed at step k)."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if start_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) < start_step]
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=start_step)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def memory_stats(device: torch.device) -> dict[str, float]:
    """Resident and peak host memory of this process, and the CUDA allocator's current and peak use (MB)."""
    out = {"mem/peak_rss_mb": peak_rss_bytes() / 2**20}
    try:
        with open("/proc/self/statm") as f:
            out["mem/rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        out["mem/cuda_alloc_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["mem/cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["mem/cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / 2**20
    return out


class Progress:
    """Rank 0's progress bar over steps (common/progress.py), showing loss, learning rate, users/s and tokens/s."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain"):
        self.bar = Bar(desc, total, enabled, unit="it", initial=initial, scale=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, record: dict[str, Any]) -> None:
        post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                "users/s": f"{record['users_per_s']:.0f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if record.get("loss_scale"):
            post["scale"] = f"{record['loss_scale']:.0f}"
        self.bar.postfix(post)

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "pretraining loss") -> Path | None:
    """Plot ``loss`` against ``step`` from a metrics.jsonl; returns the PNG path (None if no points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("masked multi-label CE per masked word")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
