"""The results page: the paper's table shape from examples/experiment.py's runs, on every dataset at once.

    python examples/results_page.py --results docs/results --datasets completejourney,movielens

Reads ``<results>/<dataset>.json`` (written by examples/experiment.py) and writes, between the markers
``<!-- results-page:start -->`` and ``<!-- results-page:end -->`` of ``<results>/README.md`` (appended
when the page has none):

- the main table: rows = models (ours, the ablations, the paper's multi-task baselines, the simple
  baselines), columns = tasks x datasets, each cell the out-of-fold value with its 95% bootstrap
  interval, the best of each column in bold;
- the paired differences against ours (the same resamples for both models), marked where the interval
  lies wholly above or below 0;
- the paper's claims, one row each, with the columns where the public data supports it, contradicts it,
  or cannot tell;
- the cost of the words (tokens per user, pretraining speed) with and without discretisation;
- the commands that made each dataset's numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.atomic import atomic_write_bytes  # noqa: E402

START, END = "<!-- results-page:start -->", "<!-- results-page:end -->"
OURS = "pretrained"
MODELS = {  # key in the experiment's JSON -> the row's name, in the paper's order
    "pretrained": "UserBERT (ours: pretrained, fine-tuned)",
    "scratch": "without pretraining",
    "no_discretisation": "without discretisation (one word per action)",
    "frozen": "ours, frozen encoder + linear head",
    "wide_deep_mtl": "Wide&Deep + MTL",
    "lstm_mtl": "LSTM + MTL",
    "transformer_mtl": "Transformer + MTL",
    "popular": "most popular (next_movie: most popular unseen)",
    "history": "popular + own history",
    "logreg": "logistic regression on counts",
}
COLUMNS = {"binary": ("auc",), "multiclass": ("accuracy", "macro_f1"), "next": ("map@10",)}
METRIC_NAMES = {"auc": "AUC", "accuracy": "acc.", "macro_f1": "macro-F1", "map@10": "mAP@10"}
DATASET_NAMES = {"completejourney": "Complete Journey", "movielens": "MovieLens-100K", "synthetic": "synthetic"}
CLAIMS = [  # (the paper's claim, the model ours is compared against)
    ("UserBERT beats Wide&Deep + MTL", "wide_deep_mtl"),
    ("UserBERT beats LSTM + MTL", "lstm_mtl"),
    ("UserBERT beats Transformer + MTL", "transformer_mtl"),
    ("pretraining helps (ours > without pretraining)", "scratch"),
    ("discretisation helps (ours > one word per action)", "no_discretisation"),
]


def columns(docs: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(dataset, task, metric) of every column, datasets in the given order."""
    return [(ds, name, m) for ds, doc in docs.items() for name, t in doc["tasks"].items() for m in COLUMNS[t["task"]]]


def _cell(iv: dict | None, bold: bool = False, digits: int = 3) -> str:
    if iv is None or iv["value"] is None or iv["value"] != iv["value"]:
        return "—"
    text = f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"
    return f"**{text}**" if bold else text


def _header(cols: list[tuple[str, str, str]], docs: dict[str, dict]) -> list[str]:
    head = " | ".join(f"{DATASET_NAMES.get(ds, ds)}: {task} {METRIC_NAMES.get(m, m)} "
                      f"({docs[ds]['tasks'][task]['report']['n_users']})" for ds, task, m in cols)
    return [f"| model | {head} |", "|---|" + "---|" * len(cols)]


def main_table(docs: dict[str, dict]) -> list[str]:
    cols = columns(docs)
    metrics = {c: {k: docs[c[0]]["tasks"][c[1]]["report"]["metrics"].get(k, {}).get(c[2]) for k in MODELS}
               for c in cols}
    best = {c: max((iv["value"] for iv in per.values() if iv and iv["value"] == iv["value"]), default=None)
            for c, per in metrics.items()}
    lines = _header(cols, docs)
    for key, name in MODELS.items():
        if all(metrics[c][key] is None for c in cols):
            continue
        cells = [_cell(metrics[c][key], metrics[c][key] is not None and metrics[c][key]["value"] == best[c])
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _difference(docs: dict[str, dict], col: tuple[str, str, str], other: str) -> dict | None:
    diffs = docs[col[0]]["tasks"][col[1]]["report"]["differences"]
    return diffs.get(f"{OURS} - {other}", {}).get(col[2])


def differences_table(docs: dict[str, dict]) -> list[str]:
    cols = columns(docs)
    lines = _header(cols, docs)
    lines[0] = lines[0].replace("| model |", "| ours minus |", 1)
    for key, name in MODELS.items():
        if key == OURS:
            continue
        cells = []
        for c in cols:
            d = _difference(docs, c, key)
            if d is None:
                cells.append("—")
                continue
            text = f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            cells.append(f"**{text}**" if d["low"] > 0 else f"_{text}_" if d["high"] < 0 else text)
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def verdicts(docs: dict[str, dict]) -> list[str]:
    """Per claim: the columns whose paired interval is above 0 (holds), below 0 (reversed) or straddles it."""
    lines = ["| the paper's claim | holds (interval > 0) | reversed (interval < 0) | cannot tell |",
             "|---|---|---|---|"]
    for claim, other in CLAIMS:
        sides: dict[str, list[str]] = {"holds": [], "reversed": [], "unclear": []}
        for c in columns(docs):
            d = _difference(docs, c, other)
            if d is None:
                continue
            label = f"{DATASET_NAMES.get(c[0], c[0])} {c[1]} {METRIC_NAMES.get(c[2], c[2])}"
            sides["holds" if d["low"] > 0 else "reversed" if d["high"] < 0 else "unclear"].append(label)
        if any(sides.values()):
            lines.append(f"| {claim} | " + " | ".join(", ".join(v) or "—" for v in sides.values()) + " |")
    return lines


def cost_table(docs: dict[str, dict]) -> list[str]:
    lines = ["| dataset | words | words per user | actions per user | pretraining s | pretraining users/s |",
             "|---|---|---|---|---|---|"]
    for ds, doc in docs.items():
        for w, v in doc["meta"].get("words", {}).items():
            lines.append(f"| {DATASET_NAMES.get(ds, ds)} | {'one per action' if w == 'action' else 'daily/session'} | "
                         f"{v['words_per_user']} | {v['actions_per_user']} | {v['pretrain_seconds']} | "
                         f"{v['pretrain_users_per_s']} |")
    return lines if len(lines) > 2 else []


def probe_table(probes: dict[str, dict]) -> list[str]:
    """One row per dataset and task: the frozen embeddings' probe beside the same probe on counts
    (examples/probe.py's ``probe_<dataset>.json``)."""
    names = sorted({m for doc in probes.values() for t in doc["tasks"].values() for m in t["report"]["metrics"]},
                   key=lambda m: (m != "counts", m))
    lines = ["| dataset: task (metric) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for ds, doc in probes.items():
        for task, t in doc["tasks"].items():
            metric = {"binary": "auc", "multiclass": "auc", "next": "map@10"}[t["task"]]
            ms = t["report"]["metrics"]
            best = max(v[metric]["value"] for v in ms.values())
            cells = [_cell(ms[m][metric], ms[m][metric]["value"] == best) if m in ms else "—" for m in names]
            lines.append(f"| {DATASET_NAMES.get(ds, ds)}: {task} ({METRIC_NAMES.get(metric, metric)}) | "
                         + " | ".join(cells) + " |")
    return lines


def render(docs: dict[str, dict], probes: dict[str, dict] | None = None) -> str:
    out = [START, "", "## The paper's comparison on public data", "",
           "Generated by `python examples/results_page.py` from each dataset's `<dataset>.json`; every cell is "
           "the out-of-fold value over all labelled users (K-fold by user, the same folds for every model) with "
           "its 95% bootstrap interval; the column header gives the labelled users. Best per column in bold.", ""]
    out += main_table(docs)
    out += ["", "Paired differences, ours minus each model (the same bootstrap resamples for both): **bold** where "
            "the interval lies above 0 (ours better), _italic_ where below 0 (ours worse).", ""]
    out += differences_table(docs)
    out += ["", "Where the paper's claims hold on this data:", ""]
    out += verdicts(docs)
    cost = cost_table(docs)
    if cost:
        out += ["", "The cost of the words: discretisation's other claim is fewer tokens per user, so cheaper "
                "training (the model keeps the last 128 words of each segment).", ""]
        out += cost
    if probes:
        out += ["", "Frozen embeddings against counting (examples/probe.py: a linear probe per attribute task, a kNN "
                "vote per next-item task, L2 and k chosen on validation users; `counts` is the same probe on the "
                "count vector: logistic regression on counts for attribute tasks, kNN over counts for next-item "
                "tasks; the per-dataset pages "
                + ", ".join(f"[probe_{ds}.md](probe_{ds}.md)" for ds in probes)
                + " have the intervals of the differences and the curves against steps and users):", ""]
        out += probe_table(probes)
    out += ["", "Reproduce (the commands as run; results are cached under each `--work`, and `--out docs/results` "
            "writes them here; the machine is named per dataset):", ""]
    for ds, doc in docs.items():
        out.append(f"- {DATASET_NAMES.get(ds, ds)}: `{doc['meta']['command']}` ({doc['meta']['machine']}, "
                   f"pretraining {doc['meta']['pretrain_seconds']:.0f} s)")
    for ds, doc in (probes or {}).items():
        out.append(f"- probes, {DATASET_NAMES.get(ds, ds)}: `{doc['command']}`")
    out += ["", END]
    return "\n".join(out) + "\n"


def write_page(results: Path, datasets: list[str], page: Path | None = None,
               probe_datasets: tuple[str, ...] = ("completejourney", "movielens", "synthetic")) -> Path:
    docs = {}
    for ds in datasets:
        path = results / f"{ds}.json"
        if not path.exists():
            raise SystemExit(f"{path}: not found; run examples/experiment.py --dataset {ds} --out {results} first")
        docs[ds] = json.loads(path.read_text())
    probes = {ds: json.loads((results / f"probe_{ds}.json").read_text())
              for ds in probe_datasets if (results / f"probe_{ds}.json").exists()}
    page = page or results / "README.md"
    block = render(docs, probes)
    old = page.read_text() if page.exists() else ""
    if START in old and END in old:
        new = old[:old.index(START)] + block.rstrip("\n") + old[old.index(END) + len(END):]
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + block
    atomic_write_bytes(page, new)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--datasets", default="completejourney,movielens")
    p.add_argument("--page", type=Path, help="default: <results>/README.md")
    args = p.parse_args(argv)
    print(write_page(args.results, args.datasets.split(","), args.page))
    return 0


if __name__ == "__main__":
    sys.exit(main())
