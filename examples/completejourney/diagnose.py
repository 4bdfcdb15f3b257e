"""Why pretraining has little to work with on the Complete Journey sample: how much personal signal is there?

    python examples/completejourney/diagnose.py --work runs/experiment-completejourney

Reads the converted data and tokenized directory that examples/experiment.py left in ``--work``
(and its pretraining run, if any) and prints, as markdown:

1. the next-category labels against the users' own histories: how many future categories a
   household bought before, and how well the global top-10 covers them;
2. the best possible blend of popularity and own history, ``pop_share + w * own_count``, with w
   chosen on the same users (an optimistic upper bound on what a user's history adds to
   popularity at rank 10);
3. the pretext task: each head's training loss at the end of pretraining against the entropy of
   its attribute's unigram distribution (what predicting the global distribution would score).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.downstream.baselines import item_counts, popularity_vector  # noqa: E402
from engine.downstream.metrics import ranking_metrics_per_user, top_k  # noqa: E402
from engine.downstream.tasks import FIRST_ID, load_task  # noqa: E402
from tokenizer.shards import open_tokenized  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the --work directory of examples/experiment.py")
    args = p.parse_args(argv)
    data = open_tokenized(args.work / "tok")
    td = load_task(args.work / "raw" / "labels" / "next_category.parquet", data, "next", "long.genre")
    counts = item_counts(data, td.rows, "long.genre", td.n_outputs)  # [n, V] own purchase counts before the cut
    rel = np.zeros_like(counts, dtype=bool)
    for i in range(len(td)):
        rel[i, td.label_ids[td.label_offsets[i]:td.label_offsets[i + 1]]] = True
    n_rel = rel.sum(1)
    seen = (rel & (counts > 0)).sum(1)
    pop = popularity_vector(td)  # label frequencies over all labelled users (a slightly optimistic popularity)
    top10 = np.argsort(-np.where(np.isfinite(pop), pop, -1))[:10]
    in_top10 = rel[:, top10].sum(1)
    days = np.diff(data.segment("long").user_word_offsets)[td.rows]  # purchase days (words) before the cut
    lines = ["### Complete Journey: how much personal signal is there?", "",
             f"- {len(td)} households with next-category labels; {n_rel.mean():.2f} future categories each "
             f"(median {np.median(n_rel):.0f}), from {days.mean():.1f} purchase days before the cut.",
             f"- Of a household's future categories, {seen.sum() / n_rel.sum():.1%} appear in its own history; "
             f"{in_top10.sum() / n_rel.sum():.1%} are among the 10 most popular categories overall."]
    share = np.where(np.isfinite(pop), pop / pop[np.isfinite(pop)].sum(), -np.inf)
    rows = []
    for w in (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0):
        scores = share[None, :] + w * counts
        m = ranking_metrics_per_user(top_k(scores, 10, np.arange(FIRST_ID)), td.label_offsets, td.label_ids, (10,))
        rows.append((w, float(np.nanmean(m["map@10"]))))
    base = rows[0][1]
    best = max(rows, key=lambda r: r[1])
    lines += ["- mAP@10 of popularity + w x own counts (w tuned on the evaluation users themselves, so optimistic): "
              + ", ".join(f"w={w:g}: {v:.4f}" for w, v in rows)
              + f". The best blend is {best[1] / base:.3f}x popularity alone."]
    metrics = args.work / "pretrain" / "metrics.jsonl"
    if metrics.exists():
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        tail = logged[-20:]
        seg = data.segment("long")
        lines += ["", "| pretext head | training loss (last 20 logs) | unigram entropy | gain (nats) |",
                  "|---|---|---|---|"]
        for k, a in enumerate(seg.attributes):
            key = f"loss/long.{a}"
            if key not in tail[0]:
                continue
            c = np.bincount(seg.attr_ids[:, k]).astype(np.float64)
            q = c[c > 0] / c.sum()
            h = float(-(q * np.log(q)).sum())
            loss = float(np.mean([r[key] for r in tail]))
            lines.append(f"| {a} | {loss:.3f} | {h:.3f} | {h - loss:+.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
