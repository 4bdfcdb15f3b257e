"""Shared fixtures of the throughput benchmarks (benchmarks/test_loader.py, test_train_step.py, ...).

``bench_full`` is True when benchmarks are measured and False under ``--benchmark-disable`` (CI), where
every benchmark runs once on small sizes as a smoke test.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return not request.config.getoption("benchmark_disable", default=False)


@pytest.fixture(scope="session")
def synth_tok(bench_full, tmp_path_factory):
    """A tokenized synthetic data set (see benchmarks/bench_data.py for its sizes)."""
    import bench_data

    return bench_data.synthetic_tokenized(bench_data.bench_cache_dir(tmp_path_factory), bench_full)
