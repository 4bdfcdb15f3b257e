"""The loader: collate (Numba: gather, masking, label CSR) on one core, and through loader threads.

    pytest benchmarks/test_loader.py --benchmark-only

- ``test_collate_one_core``: random batches of 256 users, one thread, on two length distributions:
  ``synth`` (the synthetic generator's heavy-tailed histories) and ``paper_max`` (every user at the
  paper's cap of 128 long-term + 128 short-term words, 2.5 / 6 actions per word: the most work per
  user collate can get).  Three ways: ``packed`` (:meth:`engine.data.collate.Collator.packed`, the whole of
  a loader thread's work per batch: the buffer it hands over), ``batch`` (the same as a Batch of views:
  what the trainer iterates on a CPU) and ``numpy`` (the baseline: the same batch from vectorised NumPy,
  benchmarks/baselines_collate.py).  Target (issue 7): >= 50,000 users/s per core.
- ``test_loader_workers``: :class:`engine.data.loader.TrainLoader` with 2 collate threads over a
  length-grouped plan, as the trainer runs it on a GPU host (users/s delivered to the training loop as
  Batches, in steady state: after the first batches are out).

extra_info: users/s (per core for the one-process case), actions/s, words/s.
"""

from __future__ import annotations

import os

import bench_data
import numpy as np
import pytest
import torch

from engine.data.batch import flat_tensors, unpack_batch


def _collator(data):
    from engine.config import VocabSpec
    from engine.data.collate import Collator
    from engine.model.userbert import user_attr_offsets

    return Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest)))


@pytest.fixture(scope="module")
def datasets(synth_tok, bench_full):
    from tokenizer.shards import open_tokenized

    return {"synth": open_tokenized(synth_tok),
            "paper_max": bench_data.paper_length_data(4096 if bench_full else 64)}


@pytest.mark.parametrize("impl", ["packed", "batch", "numpy"])
@pytest.mark.parametrize("dataset", ["synth", "paper_max"])
def test_collate_one_core(benchmark, datasets, bench_full, dataset, impl):
    from baselines_collate import numpy_collate

    data = datasets[dataset]
    collator = _collator(data)
    collate = {"packed": collator.packed, "batch": collator,
               "numpy": lambda users, seed: numpy_collate(data, collator.user_attr_offsets, users, seed)}[impl]
    B = 256 if bench_full else 16
    rng = np.random.default_rng(0)
    plan = [rng.choice(data.num_users, B, replace=False) for _ in range(40 if bench_full else 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collate(plan[0], 0)  # Numba: load the compiled functions outside the measurement
        out = {}

        def run():
            for i, users in enumerate(plan):
                b = collate(users, i)
            out["batch"] = b

        benchmark.pedantic(run, rounds=5 if bench_full else 1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    words = sum(int(np.diff(s.user_word_offsets)[u].sum()) for s in data.segments for u in plan)
    actions = sum(int((s.user_action_offsets[u + 1] - s.user_action_offsets[u]).sum())
                  for s in data.segments for u in plan)
    info = {"dataset": dataset, "impl": impl, "users_per_batch": B, "batches": len(plan), "words": words,
            "actions": actions, "loadavg": os.getloadavg()[0]}
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        info.update(users_per_s=B * len(plan) / sec, words_per_s=words / sec, actions_per_s=actions / sec)
    benchmark.extra_info.update(info)
    batch = unpack_batch(out["batch"]) if impl == "packed" else out["batch"]
    assert batch.batch_size == B


def test_numpy_baseline_builds_the_same_batch(datasets):
    """The baseline does our work: same layout, and with every word selected (masks then agree) the same
    label sets per masked word."""
    from baselines_collate import numpy_collate

    from engine.data.collate import CollateConfig, Collator

    data = datasets["synth"]
    ours = Collator(data, _collator(data).user_attr_offsets, CollateConfig(select_prob=1.0))
    users = np.random.default_rng(1).choice(data.num_users, 24, replace=False)
    a = ours(users, 3)
    b = numpy_collate(data, ours.user_attr_offsets, users, 3, select_prob=1.0)
    assert a.max_len == b.max_len
    for x, y in zip(flat_tensors(a)[:3], flat_tensors(b)[:3], strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a.segments, b.segments, strict=True):
        for name in ("attr_ids", "word_offsets", "word_pos", "word_slot", "masked"):
            assert torch.equal(getattr(sa, name), getattr(sb, name)), name
        assert len(sa.masked) == sa.n_words > 0
        for k in range(len(sa.label_ids)):
            assert torch.equal(sa.label_offsets[k], sb.label_offsets[k])
            lo = sa.label_offsets[k].tolist()
            for m in range(len(lo) - 1):
                assert sorted(sa.label_ids[k][lo[m]:lo[m + 1]].tolist()) == sb.label_ids[k][lo[m]:lo[m + 1]].tolist()


@pytest.mark.parametrize("dataset", ["synth", "paper_max"])
def test_loader_workers(benchmark, datasets, bench_full, dataset):
    """Steady state: the clock starts once the threads have delivered their first batches."""
    from engine.data.loader import TrainBatches, TrainLoader, batch_layout

    data = datasets[dataset]
    collator = _collator(data)
    B = 256 if bench_full else 16
    steps, warm = (60, 8) if bench_full else (4, 1)
    workers = 2
    counted = {}

    def start():
        ds = TrainBatches(collator, batch_layout(B, 1), rank=0, seed=0, start_step=0, end_step=steps)
        loader = iter(TrainLoader(ds, workers=workers, prefetch_factor=4))
        for _ in range(warm):
            next(loader)
        return (loader,), {}

    def run(loader):
        n = 0
        try:
            while (batch := next(loader, None)) is not None:  # not `for`: iter() would restart the loader
                n += batch.batch_size
        finally:
            loader.close()
        counted["users"] = n

    benchmark.pedantic(run, setup=start, rounds=3 if bench_full else 1, iterations=1)
    assert counted["users"] == B * (steps - warm)
    info = {"dataset": dataset, "threads": workers, "users_per_batch": B, "steps": steps - warm,
            "loadavg": os.getloadavg()[0]}
    if benchmark.stats is not None:
        sec = benchmark.stats.stats.median
        info.update(users_per_s=B * (steps - warm) / sec, users_per_s_per_thread=B * (steps - warm) / sec / workers)
    benchmark.extra_info.update(info)
