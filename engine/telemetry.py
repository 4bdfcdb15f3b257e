"""Training telemetry: JSONL metrics, TensorBoard scalars, and a loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors the numbers to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

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
