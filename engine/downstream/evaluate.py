"""`userbert-engine evaluate`: metrics with bootstrap confidence intervals, models against baselines on
the same held-out users.

Every model and baseline is scored on the same test users, and the bootstrap resamples those users
once for all of them, so the interval of a *difference* (pretrained - scratch) is a paired one:
it is much narrower than the two separate intervals suggest when the models err on the same users.

Outputs follow :func:`engine.downstream.finetune.predict`: scores ``[n, n_outputs]`` for binary/multiclass,
top-k item ids ``[n, k]`` for next-item tasks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_bytes
from engine.downstream.baselines import fit_logreg, history_scorer, popularity_scores
from engine.downstream.metrics import bootstrap_indices, task_statistics, top_k
from engine.downstream.tasks import FIRST_ID, PRIMARY_METRIC, Split, TaskData
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

BASELINES = ("popular", "history", "logreg")
DEFAULT_KS = (10, 20)


def metric_names(task: str, ks: tuple[int, ...] = DEFAULT_KS) -> list[str]:
    if task == "next":
        return [f"{m}@{k}" for k in ks for m in ("map", "recall", "ndcg")]
    return ["auc", "accuracy"]


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def fmt(self, digits: int = 4) -> str:
        if not np.isfinite(self.value):
            return "—"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _interval(f, n: int, idx: np.ndarray, alpha: float) -> Interval:
    value = float(f(np.arange(n)))
    boots = np.asarray(f(idx), dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if not len(boots):
        return Interval(value, float("nan"), float("nan"))
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Interval(value, float(lo), float(hi))


@dataclass
class EvalReport:
    task: str
    n_users: int  # test users
    metrics: dict[str, dict[str, Interval]]  # model -> metric -> interval
    differences: dict[str, dict[str, Interval]] = field(default_factory=dict)  # "a - b" -> metric -> interval
    n_boot: int = 1000
    alpha: float = 0.05

    @property
    def primary(self) -> str:
        return PRIMARY_METRIC[self.task]

    def to_dict(self) -> dict[str, Any]:
        as_d = lambda d: {m: {k: vars(i) for k, i in v.items()} for m, v in d.items()}
        return {"task": self.task, "n_users": self.n_users, "n_boot": self.n_boot, "alpha": self.alpha,
                "metrics": as_d(self.metrics), "differences": as_d(self.differences)}

    def markdown(self, metrics: list[str] | None = None, title: str | None = None) -> str:
        metrics = metrics or list(next(iter(self.metrics.values())).keys())
        ci = int(round(100 * (1 - self.alpha)))
        lines = [f"### {title}" if title else "", "",
                 f"{self.n_users} test users; value [{ci}% bootstrap interval, {self.n_boot} resamples of the users].",
                 "", "| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        best = {m: max((v[m].value for v in self.metrics.values() if np.isfinite(v[m].value)), default=None)
                for m in metrics}
        for name, ms in self.metrics.items():
            cells = []
            for m in metrics:
                c = ms[m].fmt()
                cells.append(f"**{c}**" if best[m] is not None and ms[m].value == best[m] else c)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.differences:
            lines += ["", f"Paired differences ({self.primary}; the same resamples for both models):", "",
                      "| comparison | difference | share of resamples > 0 |", "|---|---|---|"]
            for name, d in self.differences.items():
                iv = d[self.primary]
                share = d.get(f"{self.primary}:p>0")
                lines.append(f"| {name} | {iv.fmt()} | {share.value:.3f} |" if share else f"| {name} | {iv.fmt()} | |")
        return "\n".join(lines).strip("\n") + "\n"


def evaluate_outputs(td: TaskData, outputs: dict[str, np.ndarray], *, ks: tuple[int, ...] = DEFAULT_KS,
                     n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                     compare: list[tuple[str, str]] | None = None, groups: np.ndarray | None = None) -> EvalReport:
    """Metrics with percentile-bootstrap intervals for each model's outputs on the users of ``td``.

    ``compare``: (a, b) pairs whose paired difference a - b gets an interval too (default: the first
    model against each other one).  ``groups``: the cross-validation fold of each user; AUC is then
    the mean over folds, and the bootstrap resamples users within each fold.
    """
    n = len(td)
    if groups is None:
        idx = bootstrap_indices(n, n_boot, seed)
    else:
        groups = np.asarray(groups)
        idx = np.concatenate([members[bootstrap_indices(len(members), n_boot, seed + 1 + j)]
                              for j, members in enumerate(np.flatnonzero(groups == g) for g in np.unique(groups))],
                             axis=1)
    stats = {name: task_statistics(td, out, ks, groups) for name, out in outputs.items()}
    report = EvalReport(td.task, n, {}, n_boot=n_boot, alpha=alpha)
    for name, fs in stats.items():
        report.metrics[name] = {m: _interval(f, n, idx, alpha) for m, f in fs.items()}
    names = list(outputs)
    pairs = compare if compare is not None else [(names[0], b) for b in names[1:]]
    for a, b in pairs:
        d: dict[str, Interval] = {}
        for m in stats[a]:
            fa, fb = stats[a][m], stats[b][m]
            diff = lambda i, fa=fa, fb=fb: np.asarray(fa(i), dtype=np.float64) - np.asarray(fb(i), dtype=np.float64)
            d[m] = _interval(diff, n, idx, alpha)
            boots = diff(idx)
            boots = boots[np.isfinite(boots)]
            d[f"{m}:p>0"] = Interval(float((boots > 0).mean()) if len(boots) else float("nan"), 0.0, 1.0)
        report.differences[f"{a} - {b}"] = d
    return report


# -- baselines on a split ---------------------------------------------------------------------------------
def baseline_outputs(data: TokenizedData, td: TaskData, split: Split, names: tuple[str, ...] = BASELINES,
                     next_attribute: str = "long.genre", k: int = max(DEFAULT_KS), block: int = 4096
                     ) -> dict[str, np.ndarray]:
    """Outputs of each baseline on the test users (trained on the train users; logreg's L2 is chosen on
    the validation users)."""
    train, val, test = td.subset(split.train), td.subset(split.val), td.subset(split.test)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "history" and td.task != "next":
            continue
        if name == "popular":
            scorer = lambda rows: popularity_scores(train, len(rows))
        elif name == "history":
            scorer = history_scorer(data, train, next_attribute, val)
        elif name == "logreg":
            model = fit_logreg(data, train, val if len(val) else None)
            log.info("logreg baseline: L2 %g (tried %s)", model.l2,
                     ", ".join(f"{v:g}: {s:.4f}" for v, s in model.linear.tried))
            scorer = lambda rows, model=model: model.scores(data, rows)
        else:
            raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
        parts = []
        for i in range(0, len(test), block):  # blocks: a large vocabulary never needs [n_test, V] at once
            s = scorer(test.rows[i:i + block])
            if td.task == "next":  # seen items (exclude_seen) are never ranked: popular becomes popular-unseen
                s = top_k(s, k, np.arange(FIRST_ID), test.seen_csr(), i)
            parts.append(s)
        out[name] = np.concatenate(parts) if parts else np.zeros((0, k if td.task == "next" else td.n_outputs))
    return out


# -- curves -----------------------------------------------------------------------------------------------
def plot_curves(histories: dict[str, list[dict[str, float]]], metric: str, path: str | Path, *,
                title: str = "", flat: dict[str, float] | None = None) -> Path:
    """Metric against epoch per model (like the paper's figures); ``flat`` baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, hist in histories.items():
        xs = [h["epoch"] + 1 for h in hist if metric in h]
        ys = [h[metric] for h in hist if metric in h]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    for i, (name, v) in enumerate((flat or {}).items()):
        if np.isfinite(v):
            ax.axhline(v, linestyle="--", color=f"C{len(histories) + i}", label=name)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, reports: dict[str, EvalReport], title: str = "Evaluation") -> Path:
    """EVALDIR/results.md and results.json for one or more tasks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "\n".join([f"# {title}", ""] + [r.markdown(title=name) + "\n" for name, r in reports.items()])
    doc = json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2)
    atomic_write_bytes(out_dir / "results.md", md)
    atomic_write_bytes(out_dir / "results.json", doc)
    return out_dir / "results.md"
