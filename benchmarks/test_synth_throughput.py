"""Synthetic log generation throughput (events written per second, Parquet included).

`pytest benchmarks/test_synth_throughput.py --benchmark-only` generates 200k users (about 12M
events); with `--benchmark-disable` it is a quick smoke test on 10k users.
"""

from tokenizer.synthetic import generate


def test_synth_throughput(benchmark, tmp_path):
    n_users = 10_000 if benchmark.disabled else 200_000
    summary: dict = {}

    def run() -> None:
        summary.update(generate(tmp_path / "synth", n_users, seed=0, progress=False))

    benchmark.pedantic(run, rounds=1, iterations=1)
    counts = summary["counts"]
    benchmark.extra_info.update(
        n_users=n_users,
        events=counts["events"],
        long_events=counts["long_events"],
        short_events=counts["short_events"],
        events_per_s=summary["events_per_s"],
    )
    assert counts["events"] > 30 * n_users
    assert summary["events_per_s"] > 0
