"""The tokenizer at scale: determinism across workers, jobs and spill modes, resuming after a
crash, and peak memory under --memory-limit (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenizer import shards
from tokenizer.manifest import check_accounting
from tokenizer.merge import MergeError, merge_parts
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema, schema_from_dict
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate
from tokenizer.units import plan_units


@pytest.fixture(autouse=True, scope="module")
def _no_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shards, "FSYNC", False)
        yield


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "raw"
    generate(root, 600, seed=4, n_genres=50, n_shops=300, chunk_users=150, progress=False, event_order="shuffle")
    return root


def _outputs(d: Path) -> dict[str, bytes]:
    files = sorted([*d.glob("shards/*.arrow"), *d.glob("vocab/*.arrow"), d / "manifest.json"])
    return {str(f.relative_to(d)): f.read_bytes() for f in files}


def test_same_bytes_whatever_workers_jobs_partitions_or_spill(raw, tmp_path):
    schema = load_schema(raw / "schema.toml")
    base = tokenize(schema, tmp_path / "base", shard_users=70, progress=False)
    assert check_accounting(base) == [] and len(base["shards"]) == 8
    expected = _outputs(tmp_path / "base")
    tokenize(schema, tmp_path / "w2", shard_users=70, progress=False, workers=2, spill="disk", partitions=4,
             task_rows=5000, batch_rows=777)
    assert _outputs(tmp_path / "w2") == expected
    tokenize(schema, tmp_path / "p16", shard_users=70, progress=False, spill="disk", partitions=16)
    assert _outputs(tmp_path / "p16") == expected
    # Three jobs into one directory, then merge: the same manifest and shards as one run.
    parts = []
    for i in range(3):
        parts.append(tokenize(schema, tmp_path / "jobs", shard_users=70, progress=False, num_shards=3, shard_index=i,
                              workers=1 + i % 2))
    assert [p["part"]["shards"] for p in parts] == [[0, 3], [3, 6], [6, 8]]
    with pytest.raises(MergeError, match="1 of 3 parts missing"):
        (tmp_path / "jobs" / "parts" / "part-00001-of-00003.json").rename(tmp_path / "p1.json")
        merge_parts(tmp_path / "jobs")
    (tmp_path / "p1.json").rename(tmp_path / "jobs" / "parts" / "part-00001-of-00003.json")
    merge_parts(tmp_path / "jobs", verify=True)
    assert _outputs(tmp_path / "jobs") == expected
    # Jobs on machines without a shared disk: separate directories gathered by merge.
    for i in range(2):
        tokenize(schema, tmp_path / f"sep{i}", shard_users=70, progress=False, num_shards=2, shard_index=i)
    merge_parts(tmp_path / "merged", [tmp_path / "sep0", tmp_path / "sep1"])
    assert _outputs(tmp_path / "merged") == expected


def test_units_fit_the_budget_and_split_partitions_when_needed():
    # One partition of 4 shards holding 1000 bytes of events: a budget of 600 splits it.
    index = np.array([[0, 0, 0, 40, 320]], np.int64)  # stream 0, partition 0, 40 rows, 320 key bytes
    units = plan_units([(Path("x"), index)], 0, 2, (0, 4), 10**9, [1])
    assert [(u.partitions, u.shards, u.filter) for u in units] == [((0, 1), (0, 4), False)]
    units = plan_units([(Path("x"), index)], 0, 2, (0, 4), units[0].est_bytes // 2, [1])
    assert [u.shards for u in units] == [(0, 2), (2, 4)] and all(u.filter for u in units)
    # A job owning shards 1..2 of 4 reads partition 0 and skips the other shards' users.
    units = plan_units([(Path("x"), index)], 0, 2, (1, 3), 10**9, [1])
    assert [(u.shards, u.filter) for u in units] == [((1, 3), True)]
    # More partitions than shards: a unit is a shard and reads its partitions.
    index = np.array([[0, p, 0, 10, 80] for p in range(8)], np.int64)
    units = plan_units([(Path("x"), index)], 3, 1, (0, 2), 10**9, [1])
    assert [(u.partitions, u.shards) for u in units] == [((0, 4), (0, 1)), ((4, 8), (1, 2))]


# peak_rss_bytes reads VmHWM: this process's own peak (ru_maxrss would include the pytest
# process's pages that the child held between fork and exec).
_RUN = """
import json, sys
from tokenizer import shards
from tokenizer.pipeline import tokenize
from common.progress import peak_rss_bytes
from tokenizer.schema import load_schema
shards.FSYNC = False
kw = json.loads(sys.argv[3])
m = tokenize(load_schema(sys.argv[1]), sys.argv[2], progress=False, **kw)
print(json.dumps({"peak_rss": peak_rss_bytes(), "users": m["counts"]["users"]}))
"""


def _run(schema: Path, out: Path, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, str(schema), str(out), json.dumps(kw)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("phase", ["tasks", "units"])
def test_resume_after_a_crash_gives_the_same_bytes(raw, tmp_path, phase):
    kw = {"shard_users": 70, "spill": "disk", "partitions": 8, "task_rows": 4000}
    crashed = _run(raw / "schema.toml", tmp_path / "tok", {"USERBERT_TOKENIZE_CRASH": f"{phase}:2"}, **kw)
    assert crashed.returncode == 137, crashed.stderr
    work = tmp_path / "tok" / "_work"
    assert not (tmp_path / "tok" / "manifest.json").exists()
    assert len(list((work / phase).glob("*.json"))) == 2
    stats: dict = {}
    tokenize(load_schema(raw / "schema.toml"), tmp_path / "tok", progress=False, stats=stats, **kw)
    assert stats["resumed"] and stats[f"resumed_{phase}"] == 2
    assert not work.exists()  # removed after success
    tokenize(load_schema(raw / "schema.toml"), tmp_path / "clean", progress=False, **kw)
    assert _outputs(tmp_path / "tok") == _outputs(tmp_path / "clean")


def test_a_changed_input_is_not_resumed(raw, tmp_path):
    kw = {"shard_users": 70, "spill": "disk", "partitions": 8, "task_rows": 4000}
    crashed = _run(raw / "schema.toml", tmp_path / "tok", {"USERBERT_TOKENIZE_CRASH": "units:1"}, **kw)
    assert crashed.returncode == 137, crashed.stderr
    stats: dict = {}
    tokenize(load_schema(raw / "schema.toml"), tmp_path / "tok", progress=False, stats=stats,
             **{**kw, "shard_users": 50})  # other arguments: start afresh
    assert not stats["resumed"] and stats["resumed_units"] == 0


def test_peak_memory_stays_under_the_limit_on_a_larger_input(tmp_path):
    """15M events (480 MB as Arrow columns; the in-memory pipeline of the foundation needed over
    1 GB for them) under a 450 MB limit: the events are spilled in partitions and processed a
    unit at a time.  The kernels are compiled (cached) first, so the subprocess measures the
    tokenizer, not the compiler."""
    n, n_users = 15_000_000, 500_000
    rng = np.random.default_rng(0)
    start = 1767225600

    def write(folder: Path, rows: int, files: int) -> int:
        folder.mkdir()
        nbytes = 0
        for f in range(files):
            m = rows // files
            table = pa.table({
                "user_id": rng.integers(0, n_users, m) * 7919,
                "ts": start + rng.integers(0, 30 * 86400, m),
                "kind": rng.integers(0, 5, m),
                "item": rng.zipf(1.5, m) % 5000,
            })
            pq.write_table(table, folder / f"part-{f}.parquet", compression="none")
            nbytes += table.nbytes
        return nbytes

    def schema(folder: str):
        return schema_from_dict({
            "data": {"window_start": "2026-01-01T00:00:00", "window_end": "2026-02-01T00:00:00", "timezone": "UTC"},
            "segments": {"ev": {"path": folder, "word_rule": "session", "position_unit": "hour",
                                "attributes": [{"name": "kind"}, {"name": "item"}]}},
        }, tmp_path)

    limit = 450 << 20
    write(tmp_path / "warm", 20_000, 2)
    tokenize(schema("warm"), tmp_path / "warm_tok", progress=False, memory_limit=limit, workers=2, spill="disk")
    assert write(tmp_path / "ev", n, 3) > limit
    (tmp_path / "schema.toml").write_text(schema("ev").to_toml())
    done = _run(tmp_path / "schema.toml", tmp_path / "tok", memory_limit=limit, workers=2)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["users"] == n_users
    assert result["peak_rss"] <= limit, f"peak RSS {result['peak_rss'] >> 20} MiB over {limit >> 20} MiB"
    data = open_tokenized(tmp_path / "tok")
    assert data.num_users == n_users and len(data.manifest["shards"]) >= 8
