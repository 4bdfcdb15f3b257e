"""Training data plan: batch layout arithmetic, per-rank micro-batches, workers, data-wait timing."""

import numpy as np
import pytest
import torch

from engine.config import VocabSpec
from engine.data.batch import flat_tensors
from engine.data.collate import CollateConfig, Collator
from engine.data.loader import BatchLayout, TrainBatches, TrainLoader, batch_layout, epoch_plan, pretrain_batches
from engine.model.userbert import user_attr_offsets
from tokenizer.pipeline import tokenize
from tokenizer.schema import load_schema
from tokenizer.shards import open_tokenized
from tokenizer.synthetic import generate


@pytest.fixture(scope="module")
def collator(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_train")
    generate(root / "raw", 260, seed=3, n_genres=30, n_shops=60, progress=False)
    tokenize(load_schema(root / "raw" / "schema.toml"), root / "tok", shard_users=100, progress=False)
    data = open_tokenized(root / "tok")
    return Collator(data, user_attr_offsets(VocabSpec.from_manifest(data.manifest)), CollateConfig())


def test_batch_layout_derives_micro_batch_and_accumulation():
    assert batch_layout(16, 1) == BatchLayout(16, 16, 1, 1)
    assert batch_layout(16, 2) == BatchLayout(16, 8, 1, 2)
    assert batch_layout(16, 2, micro_batch=4) == BatchLayout(16, 4, 2, 2)
    assert batch_layout(48, 4, accumulation=3) == BatchLayout(48, 4, 3, 4)
    assert batch_layout(16, 2, 4, 2).n_slots == 4


@pytest.mark.parametrize("args, match", [
    ((16, 3), r"batch_size = 16 users is not divisible by the world size 3"),
    ((16, 2, 3), r"8 users per rank, not a multiple of micro_batch_size 3"),
    ((16, 2, 0, 3), r"not divisible into 3 accumulation steps"),
    ((16, 2, 4, 3), r"batch_size 16 != micro_batch_size 4 x gradient accumulation 3 x world size 2"),
])
def test_batch_layout_errors_name_the_numbers(args, match):
    with pytest.raises(ValueError, match=match):
        batch_layout(*args)


def _items(ds: TrainBatches) -> list[tuple[np.ndarray, int]]:
    return [ds.users(k) for k in range(len(ds))]


def test_one_slot_is_the_single_process_plan(collator):
    """1 rank, no accumulation: exactly pretrain_batches' users and masks, across an epoch boundary."""
    ds = TrainBatches(collator, batch_layout(32, 1), 0, seed=5, start_step=0, end_step=12)
    ref = pretrain_batches(collator, 32, seed=5)
    for k in range(len(ds)):
        step, batch = next(ref)
        got = ds[k]
        assert step == k
        assert torch.equal(got.users, batch.users)
        for a, b in zip(got.segments, batch.segments):
            assert torch.equal(a.masked, b.masked) and torch.equal(a.masked_zero, b.masked_zero)


def test_ranks_read_disjoint_users_each_epoch_and_all_of_a_global_batch(collator):
    n = collator.data.num_users
    layout = batch_layout(32, 2, micro_batch=8)  # 2 ranks x 2 accumulation steps
    per_epoch = n // 32
    seen = {}
    for rank in range(2):
        ds = TrainBatches(collator, layout, rank, seed=1, start_step=0, end_step=per_epoch)
        seen[rank] = np.concatenate([u for u, _ in _items(ds)])
    assert len(np.intersect1d(seen[0], seen[1])) == 0
    both = np.concatenate([seen[0], seen[1]])
    assert len(both) == len(np.unique(both)) == per_epoch * 32
    # The same global batches as the single-process plan, split four ways.
    plan = epoch_plan(n, 32, seed=1, epoch=0, lengths=TrainBatches(collator, layout, 0, 1, 0, 1).lengths)
    assert np.array_equal(np.sort(both), np.sort(np.concatenate(plan)))


def test_split_depends_only_on_the_number_of_slots(collator):
    """1 rank x 2 accumulation steps sees exactly the micro-batches (users and seeds) of 2 ranks x 1 step."""
    one = TrainBatches(collator, batch_layout(32, 1, micro_batch=16), 0, 2, 0, 5)
    two = [TrainBatches(collator, batch_layout(32, 2), r, 2, 0, 5) for r in range(2)]
    for step in range(5):
        for a in range(2):
            u1, s1 = one.users(step * 2 + a)
            u2, s2 = two[a].users(step)
            assert np.array_equal(u1, u2) and s1 == s2


def test_start_step_resumes_the_same_items(collator):
    layout = batch_layout(32, 2, micro_batch=8)
    full = TrainBatches(collator, layout, 1, 4, 0, 20)
    tail = TrainBatches(collator, layout, 1, 4, 13, 20)
    for k in range(len(tail)):
        a, b = full.users(13 * 2 + k), tail.users(k)
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_workers_give_the_same_batches_and_wait_is_timed(collator):
    ds = TrainBatches(collator, batch_layout(16, 1), 0, 7, 0, 10)
    plain = list(TrainLoader(ds, workers=0))
    loader = TrainLoader(ds, workers=2, prefetch_factor=2)
    try:
        pooled = list(loader)  # threads collate ahead, out of order; batches come out in plan order
    finally:
        loader.close()
    assert len(plain) == len(pooled) == 10
    for a, b in zip(plain, pooled):
        assert a.max_len == b.max_len
        ta, tb = flat_tensors(a), flat_tensors(b)
        assert len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))
    assert loader.take_wait() > 0 and loader.take_wait() == 0.0


def test_loader_thread_errors_reach_the_trainer_and_close_stops_early(collator):
    ds = TrainBatches(collator, batch_layout(16, 1), 0, 7, 0, 50)
    loader = TrainLoader(ds, workers=2, prefetch_factor=2)
    it = iter(loader)
    first = next(it)
    loader.close()  # mid-epoch: queued batches are dropped, nothing hangs
    again = next(iter(loader))  # a fresh pass starts from the first batch
    assert torch.equal(first.users, again.users)
    loader.close()

    class Broken:
        data = collator.data

        def packed(self, users, seed):
            raise ValueError(f"bad batch {seed}")

    bad = TrainBatches(collator, batch_layout(16, 1), 0, 7, 0, 5)
    bad.collator = Broken()
    loader = TrainLoader(bad, workers=2)
    with pytest.raises(ValueError, match="bad batch"):
        next(iter(loader))
    loader.close()
