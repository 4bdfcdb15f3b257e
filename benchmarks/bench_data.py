"""Data for the throughput benchmarks: synthetic logs tokenized once per session, and batch plans.

Sizes: ``full`` (benchmarks enabled) is 20,000 synthetic users with the generator's default catalogue
(20,000 shops, 2,000 genres: head vocabularies of about 19.5k + 20.5k); the smoke size (CI,
``--benchmark-disable``) is 400 users with a small catalogue, so every benchmark runs once in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"


def synthetic_tokenized(root: Path, full: bool) -> Path:
    """Generate and tokenize synthetic logs under ``root`` (once; reused when already there)."""
    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema
    from tokenizer.synthetic import generate

    tok = root / ("tok-full" if full else "tok-smoke")
    if (tok / "manifest.json").exists():
        return tok
    raw = root / ("raw-full" if full else "raw-smoke")
    if full:
        generate(raw, 20_000, seed=0, progress=False)
    else:
        generate(raw, 400, seed=0, n_genres=60, n_shops=200, progress=False)
    tokenize(load_schema(raw / "schema.toml"), tok, progress=False)
    return tok


def bench_cache_dir(tmp_path_factory) -> Path:
    """USERBERT_BENCH_CACHE (to reuse generated data across runs) or a pytest temporary directory."""
    env = os.environ.get("USERBERT_BENCH_CACHE")
    if env:
        Path(env).mkdir(parents=True, exist_ok=True)
        return Path(env)
    return tmp_path_factory.mktemp("bench-data")


def padding_waste(seq_lens: list[np.ndarray]) -> tuple[float, float]:
    """(token waste, attention waste) of padded batches: the share of grid tokens, and of the
    T^2 attention scores, that are padding."""
    tok = sum(int(s.sum()) for s in seq_lens) / sum(len(s) * int(s.max()) for s in seq_lens)
    att = sum(int((s.astype(np.int64) ** 2).sum()) for s in seq_lens) / sum(len(s) * int(s.max()) ** 2
                                                                              for s in seq_lens)
    return 1.0 - tok, 1.0 - att


def paper_length_data(n_users: int, seed: int = 0, words: int = 128):
    """An in-memory TokenizedData whose users all have ``words`` long-term and ``words`` short-term words
    (the paper's cap of 128 per segment: the longest sequences collate ever sees), 2.5 / 6 actions per
    word on average (geometric, capped at 32), Zipf ids over the paper's vocabularies (Table 1)."""
    import pyarrow as pa

    from tokenizer.shards import SegmentArrays, TokenizedData

    rng = np.random.default_rng(seed)
    layout = [("long", ["action", "channel", "expense", "shop", "genre", "hour"], [10, 12, 14, 85124, 11438, 26],
               [8, 8, 8, 48, 40, 16], 2.5, 400),
              ("short", ["action", "shop", "genre", "device"], [10, 40804, 10386, 8], [16, 64, 40, 8], 6.0, 200)]
    segs, meta = [], {}
    for name, attrs, vocabs, dims, actions, n_pos in layout:
        n_words = n_users * words
        word_len = np.minimum(rng.geometric(1.0 / actions, n_words), 32).astype(np.int32)
        per_user = word_len.reshape(n_users, words).sum(axis=1)
        ids = np.stack([2 + (rng.zipf(1.2, int(word_len.sum())) - 1) % (v - 2) for v in vocabs], axis=1)
        segs.append(SegmentArrays(
            name, attrs, np.arange(n_users + 1, dtype=np.int64) * words,
            np.sort(rng.integers(0, n_pos, (n_users, words)), axis=1).astype(np.int32).ravel(), word_len,
            np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64), np.ascontiguousarray(ids, dtype=np.int32)))
        meta[name] = {"attributes": attrs, "vocab_sizes": vocabs, "dims": dims, "num_positions": n_pos,
                      "max_words": words}
    user_vocabs = [4, 10, 50]
    ua = np.stack([rng.integers(2, v, n_users) for v in user_vocabs], axis=1).astype(np.int32)
    manifest = {"segments": meta, "user_attributes": {"names": ["gender", "age", "region"],
                                                      "vocab_sizes": user_vocabs}}
    return TokenizedData(Path("."), manifest, pa.array(np.arange(n_users)), ua, segs)


def completejourney_tokenized(root: Path) -> Path:
    """Complete Journey 2.0's sample (shipped in examples/completejourney/data), converted and tokenized."""
    import subprocess
    import sys

    from tokenizer.pipeline import tokenize
    from tokenizer.schema import load_schema

    tok = root / "cj-tok"
    if (tok / "manifest.json").exists():
        return tok
    script = Path(__file__).resolve().parents[1] / "examples" / "completejourney" / "convert.py"
    subprocess.run([sys.executable, str(script), "--out", str(root / "cj")], check=True, capture_output=True)
    tokenize(load_schema(root / "cj" / "schema.toml"), tok, progress=False)
    return tok
