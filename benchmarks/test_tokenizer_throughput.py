"""Tokenizer throughput: end to end from Parquet to shards, against Polars and pandas pipelines
that compute the same words (benchmarks/test_tokenizer_baselines.py), the Numba kernels against
vectorised numpy, and peak memory at 50M events.

`pytest benchmarks/test_tokenizer_throughput.py --benchmark-only` uses synthetic logs of about
1M and 10M events (and 50M for the memory run), rows shuffled within each file like unsorted
logs; with `--benchmark-disable` every case runs once on a few thousand users as a smoke test.
Results go to docs/bench/tokenizer.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_tokenizer_baselines import pandas_pipeline, polars_pipeline

from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.synthetic import generate
from tokenizer.words import sort_rows, split_words

USERS = {"1M": 15_600, "10M": 156_000, "50M": 780_000}  # about 64 events per user
SMOKE_USERS = 2_000
_DATA: dict[str, Path] = {}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokbench")


def synthetic(root: Path, size: str, disabled: bool) -> Path:
    """Synthetic logs of ``size`` (generated once per session), rows shuffled in each file."""
    key = "smoke" if disabled else size
    if key not in _DATA:
        n = SMOKE_USERS if disabled else USERS[size]
        generate(root / key, n, seed=0, progress=False, event_order="shuffle")
        _DATA[key] = root / key
    return _DATA[key]


def _events(raw: Path) -> int:
    return json.loads((raw / "SYNTH.json").read_text())["counts"]["events"]


def _record(benchmark, raw: Path, workers: int | None = None) -> None:
    events = _events(raw)
    seconds = benchmark.stats.stats.min if benchmark.stats else None
    benchmark.extra_info.update(events=events, cpu_count=os.cpu_count(), loadavg=os.getloadavg()[0])
    if workers is not None:
        benchmark.extra_info["workers"] = workers
    if seconds:
        benchmark.extra_info["events_per_s"] = round(events / seconds)


@pytest.mark.parametrize("size", ["1M", "10M"])
@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_end_to_end(benchmark, data_root, tmp_path, size, workers):
    raw = synthetic(data_root, size, benchmark.disabled)
    schema = load_schema(raw / "schema.toml")
    tokenize(schema, tmp_path / "warm", progress=False, workers=workers)  # compile/load kernels, warm the cache
    manifest = {}

    def run() -> None:
        manifest.update(tokenize(schema, tmp_path / "tok", progress=False, workers=workers))

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    _record(benchmark, raw, workers)
    assert manifest["counts"]["events_read"] == _events(raw)


@pytest.mark.parametrize("size", ["1M", "10M"])
def test_polars_pipeline(benchmark, data_root, tmp_path, size):
    raw = synthetic(data_root, size, benchmark.disabled)
    schema = load_schema(raw / "schema.toml")
    words: dict[str, int] = {}
    benchmark.pedantic(lambda: words.update(polars_pipeline(schema, tmp_path / "pl")),
                       rounds=1 if benchmark.disabled else 3, iterations=1)
    _record(benchmark, raw)
    assert sum(words.values()) > 0


@pytest.mark.parametrize("size", ["1M"])  # about a minute a round at 10M: left out
def test_pandas_pipeline(benchmark, data_root, tmp_path, size):
    raw = synthetic(data_root, size, benchmark.disabled)
    schema = load_schema(raw / "schema.toml")
    words: dict[str, int] = {}
    benchmark.pedantic(lambda: words.update(pandas_pipeline(schema, tmp_path / "pd")), rounds=1, iterations=1)
    _record(benchmark, raw)
    assert sum(words.values()) > 0


# -- the kernels alone ---------------------------------------------------------------------------------------------
def _events_for_kernels(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n_users = max(1, n // 64)
    uidx = rng.integers(0, n_users, n)
    t_rel = rng.integers(0, 7 * 86400, n)  # seconds since the window start
    codes = rng.integers(0, 1000, (n, 4)).astype(np.int32)
    return uidx, t_rel, codes


def _numba_words(uidx, t_rel, codes, n_users):
    n, k = codes.shape
    luts = np.tile(np.arange(1000, dtype=np.int32), k)
    bases = (np.arange(k) * 1000).reshape(1, k).astype(np.int64)
    rows, offsets = sort_rows(uidx, t_rel << 32, codes, np.array([0, n], np.int64), luts, bases, n_users)
    t = rows[:, 1].astype(np.int64) + 1_767_225_600
    return split_words(offsets, t, None, rule="session", position_unit="hour", window_start_utc=1_767_225_600)


def _numpy_words(uidx, t_rel, codes, max_words=128, max_actions=32, gap=1800):
    """The same session words, vectorised: lexsort, boundaries by diff, truncation and cap by
    ranks computed with cumulative sums."""
    t = t_rel + 1_767_225_600
    order = np.lexsort((t, uidx))
    u, ts = uidx[order], t[order]
    first = np.ones(len(u), bool)
    first[1:] = (u[1:] != u[:-1]) | (np.diff(ts) > gap)
    word = np.cumsum(first) - 1
    user_of_word = u[first]  # ascending
    index_in_user = np.arange(len(user_of_word)) - np.searchsorted(user_of_word, user_of_word)
    keep_word = np.bincount(user_of_word)[user_of_word] - index_in_user <= max_words
    size = np.bincount(word)
    pos_in_word = np.arange(len(u)) - np.repeat(np.cumsum(size) - size, size)
    keep = keep_word[word] & (size[word] - pos_in_word <= max_actions)
    return codes[order][keep], (ts[first][keep_word] - 1_767_225_600) // 3600


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_word_kernels(benchmark, impl):
    n = 20_000 if benchmark.disabled else 10_000_000
    uidx, t_rel, codes = _events_for_kernels(n)
    n_users = int(uidx.max()) + 1
    if impl == "numba":
        _numba_words(uidx[:100], t_rel[:100], codes[:100], n_users)  # compile / load
        words = benchmark(_numba_words, uidx, t_rel, codes, n_users)
        n_words = len(words.word_pos)
    else:
        kept, pos = benchmark(_numpy_words, uidx, t_rel, codes)
        n_words = len(pos)
    benchmark.extra_info.update(events=n)
    if benchmark.stats:
        benchmark.extra_info["events_per_s"] = round(n / benchmark.stats.stats.min)
    ref = _numba_words(uidx, t_rel, codes, n_users)
    assert n_words == len(ref.word_pos)


# -- memory at 50M events ------------------------------------------------------------------------------------------
_PEAK = """
import json, sys, time
from tokenizer.pipeline import tokenize
from common.progress import peak_rss_bytes
from tokenizer.schema import load_schema
t = time.perf_counter()
m = tokenize(load_schema(sys.argv[1]), sys.argv[2], progress=False, workers=2)
print(json.dumps({"peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - t,
                  "events": m["counts"]["events_read"]}))
"""


def test_peak_rss_at_50m_events(benchmark, data_root, tmp_path):
    """One run in a fresh process under the default --memory-limit (2 GB); its own peak RSS."""
    raw = synthetic(data_root, "50M", benchmark.disabled)
    result: dict = {}

    def run() -> None:
        done = subprocess.run([sys.executable, "-c", _PEAK, str(raw / "schema.toml"), str(tmp_path / "tok")],
                              capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(peak_rss_mib=result["peak_rss"] >> 20, events=result["events"],
                                events_per_s=round(result["events"] / result["seconds"]),
                                loadavg=os.getloadavg()[0])
    assert result["peak_rss"] <= 2 << 30

