"""Collate: layout of the token grid, masking statistics, and CSR multi-hot labels."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from engine.data.batch import flat_tensors, pack_batch, unpack_batch
from engine.data.collate import STAMP_MAX_VOCAB, CollateConfig, Collator


@dataclass
class FakeSegment:
    name: str
    attributes: list
    user_word_offsets: np.ndarray
    word_pos: np.ndarray
    word_len: np.ndarray
    user_action_offsets: np.ndarray
    attr_ids: np.ndarray


@dataclass
class FakeData:
    segments: list
    user_attr_ids: np.ndarray
    manifest: dict

    @property
    def num_users(self):
        return self.user_attr_ids.shape[0]


def random_data(seed: int, n_users: int = 40, K=(3, 2), U: int = 2, max_words: int = 30,
                vocab_size: int = 7) -> FakeData:
    """Ids in 0..6 (duplicates and zeros in most words); ``vocab_size`` is what the manifest declares."""
    rng = np.random.default_rng(seed)
    segs = []
    for s, k in enumerate(K):
        n_words = rng.integers(0, max_words, n_users)
        n_words[rng.random(n_users) < 0.1] = 0  # some users have no words in this segment
        uwo = np.concatenate([[0], np.cumsum(n_words)]).astype(np.int64)
        word_len = rng.integers(1, 6, uwo[-1]).astype(np.int32)
        word_pos = rng.integers(0, 90, uwo[-1]).astype(np.int32)
        csum = np.concatenate([[0], np.cumsum(word_len)])
        acts_per_user = csum[uwo[1:]] - csum[uwo[:-1]]
        uao = np.concatenate([[0], np.cumsum(acts_per_user)]).astype(np.int64)
        attr = rng.integers(0, 7, (uao[-1], k)).astype(np.int32)  # small vocab: duplicates and zeros
        segs.append(FakeSegment(f"s{s}", [f"a{i}" for i in range(k)], uwo, word_pos, word_len, uao, attr))
    manifest = {"segments": {seg.name: {"vocab_sizes": [vocab_size] * len(seg.attributes)} for seg in segs}}
    return FakeData(segs, rng.integers(1, 4, (n_users, U)).astype(np.int32), manifest)


def test_layout_matches_the_source_arrays():
    data = random_data(0)
    users = np.array([5, 0, 17, 33, 2])
    batch = Collator(data, [0, 10], CollateConfig(select_prob=0.15))(users, seed=3)
    U = 2
    n_words = np.array([[s.user_word_offsets[u + 1] - s.user_word_offsets[u] for s in data.segments] for u in users])
    assert batch.seq_lens.tolist() == (1 + U + n_words.sum(1)).tolist()
    T = batch.max_len
    assert T == int(batch.seq_lens.max())
    assert batch.user_attr_ids.tolist() == (data.user_attr_ids[users] + np.array([0, 10])).tolist()
    for s, (seg, sb) in enumerate(zip(data.segments, batch.segments)):
        w = 0
        a = 0
        for b, u in enumerate(users):
            w0, w1 = seg.user_word_offsets[u], seg.user_word_offsets[u + 1]
            before = n_words[b, :s].sum()
            for i in range(w1 - w0):
                assert sb.word_slot[w].item() == b * T + 1 + U + before + i
                assert sb.word_pos[w].item() == seg.word_pos[w0 + i]
                n = seg.word_len[w0 + i]
                assert sb.word_offsets[w + 1] - sb.word_offsets[w] == n
                w += 1
            a0, a1 = seg.user_action_offsets[u], seg.user_action_offsets[u + 1]
            assert np.array_equal(sb.attr_ids[a:a + a1 - a0].numpy(), seg.attr_ids[a0:a1])
            a += a1 - a0
        assert w == sb.n_words and a == sb.attr_ids.shape[0]
        # Every slot is inside its user's row and no two words share a slot.
    slots = np.concatenate([sb.word_slot.numpy() for sb in batch.segments])
    assert len(np.unique(slots)) == len(slots)
    rows, cols = slots // T, slots % T
    assert (cols < batch.seq_lens.numpy()[rows]).all() and (cols >= 1 + U).all()


# Both ways of finding distinct values: the stamp table (vocabularies up to STAMP_MAX_VOCAB) and the scan.
@pytest.mark.parametrize("vocab_size", [7, STAMP_MAX_VOCAB + 1])
def test_labels_are_distinct_nonzero_values_of_each_masked_word(vocab_size):
    data = random_data(1, vocab_size=vocab_size)
    batch = Collator(data, [0, 10])(np.arange(40), seed=11)
    checked = 0
    for sb in batch.segments:
        offs = sb.word_offsets.numpy()
        attr = sb.attr_ids.numpy()
        for k in range(attr.shape[1]):
            lo, li = sb.label_offsets[k].numpy(), sb.label_ids[k].numpy()
            assert len(lo) == len(sb.masked) + 1 and lo[0] == 0 and lo[-1] == len(li)
            for m, w in enumerate(sb.masked.numpy()):
                # each nonzero value once, in order of first occurrence
                expected = list(dict.fromkeys(v for v in attr[offs[w]:offs[w + 1], k].tolist() if v != 0))
                assert li[lo[m]:lo[m + 1]].tolist() == expected
                checked += 1
    assert checked > 100


def test_labels_ignore_ids_repeated_across_words():
    # A stamp left by an earlier word (same id, another masked word, another segment) must not hide it.
    data = random_data(5, n_users=30)
    for seg in data.segments:
        seg.attr_ids[:] = 3
    batch = Collator(data, [0, 10], CollateConfig(select_prob=0.5))(np.arange(30), seed=2)
    for sb in batch.segments:
        for k in range(sb.attr_ids.shape[1]):
            assert sb.label_ids[k].tolist() == [3] * len(sb.masked)
            assert sb.label_offsets[k].tolist() == list(range(len(sb.masked) + 1))


def test_masking_counts_and_rates():
    data = random_data(2, n_users=200, max_words=60)
    collate = Collator(data, [0, 10], CollateConfig(select_prob=0.15, zero_prob=0.8))
    users = np.arange(200)
    n_user = sum(s.user_word_offsets[users + 1] - s.user_word_offsets[users] for s in data.segments)
    zero = total = 0
    hits = np.zeros(60 * 2)
    for seed in range(20):
        batch = collate(users, seed=seed)
        per_user = np.zeros(200, np.int64)
        T = batch.max_len
        for sb in batch.segments:
            rows = (sb.word_slot[sb.masked] // T).numpy()
            np.add.at(per_user, rows, 1)
            zero += int(sb.masked_zero.sum())
            total += len(sb.masked)
            np.add.at(hits, (sb.word_slot[sb.masked] % T).numpy() - 3, 1)
        expected = np.where(n_user > 0, np.maximum(1, np.floor(0.15 * n_user + 0.5)), 0)
        assert per_user.tolist() == expected.tolist()
    # zero share: binomial, n ~ 20 * 200 * 9 -> sd ~ 0.003
    assert abs(zero / total - 0.8) < 0.02
    # Uniform over positions: early positions (held by every user with >= that many words) are
    # hit about as often as each other.
    early = hits[:10]
    assert early.min() > 0.8 * early.mean() and early.max() < 1.2 * early.mean()


def test_masking_is_a_function_of_the_seed():
    data = random_data(3)
    collate = Collator(data, [0, 10])
    a, b, c = collate(np.arange(30), seed=5), collate(np.arange(30), seed=5), collate(np.arange(30), seed=6)
    for sa, sb_ in zip(a.segments, b.segments):
        assert np.array_equal(sa.masked.numpy(), sb_.masked.numpy())
        assert np.array_equal(sa.masked_zero.numpy(), sb_.masked_zero.numpy())
    assert any(not np.array_equal(sa.masked.numpy(), sc.masked.numpy()) for sa, sc in zip(a.segments, c.segments))


def test_no_masking_when_disabled_and_users_without_words():
    data = random_data(4)
    for seg in data.segments:  # user 0 has no words at all
        n0 = seg.user_word_offsets[1] - seg.user_word_offsets[0]
        a0 = seg.user_action_offsets[1] - seg.user_action_offsets[0]
        seg.user_word_offsets = np.concatenate([[0], seg.user_word_offsets[1:] - n0])
        seg.word_len, seg.word_pos = seg.word_len[n0:], seg.word_pos[n0:]
        seg.user_action_offsets = np.concatenate([[0], seg.user_action_offsets[1:] - a0])
        seg.attr_ids = seg.attr_ids[a0:]
    batch = Collator(data, [0, 10], CollateConfig(select_prob=0.0))(np.array([0, 1, 2]), seed=0)
    assert all(len(sb.masked) == 0 for sb in batch.segments)
    assert all(len(lo) == 1 for sb in batch.segments for lo in sb.label_offsets)
    assert batch.seq_lens[0].item() == 3  # CLS + 2 user attributes
    only = Collator(data, [0, 10])(np.array([0]), seed=0)
    assert only.max_len == 3 and all(sb.n_words == 0 for sb in only.segments)


@pytest.mark.parametrize("seed", range(3))
def test_padding_mask(seed):
    """True exactly on each user's real tokens: CLS, user attributes and words, a prefix of the row."""
    data = random_data(seed)
    users = np.arange(10)
    batch = Collator(data, [0, 10])(users, seed=seed)
    mask = batch.padding_mask()
    n_words = sum(s.user_word_offsets[users + 1] - s.user_word_offsets[users] for s in data.segments)
    lengths = 1 + data.user_attr_ids.shape[1] + n_words  # from the data, not from the batch
    assert mask.dtype == torch.bool and tuple(mask.shape) == (len(users), lengths.max())
    expected = np.arange(lengths.max())[None, :] < lengths[:, None]
    assert np.array_equal(mask.numpy(), expected)
    flat = mask.reshape(-1)
    for sb in batch.segments:  # every word sits on a real token; padding holds none
        assert bool(flat[sb.word_slot].all())
    taken = torch.zeros_like(flat)
    for sb in batch.segments:
        taken[sb.word_slot] = True
    assert int(taken.sum()) == int(n_words.sum())


@pytest.mark.parametrize(("seed", "select_prob"), [(0, 0.15), (1, 0.5), (2, 0.0)])
def test_packed_batch_round_trips_every_tensor(seed, select_prob):
    # pack_batch: any Batch as one aligned buffer; unpack_batch: views of it.
    data = random_data(seed, K=(3, 1, 2))
    users = np.random.default_rng(seed).choice(data.num_users, 13, replace=False)
    batch = Collator(data, [0, 10], CollateConfig(select_prob=select_prob))(users, seed=seed)
    packed = pack_batch(batch)
    back = unpack_batch(packed)
    assert packed.buffer.dtype == torch.uint8 and packed.buffer.is_contiguous()
    assert back.max_len == batch.max_len and len(back.segments) == 3
    a, b = flat_tensors(batch), flat_tensors(back)
    assert len(a) == len(b) == 3 + sum(6 + 2 * k for k in (3, 1, 2))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        assert y.numel() == 0 or y.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize("select_prob", [0.15, 0.0])
def test_collator_writes_the_packed_layout_directly(select_prob):
    # Collate lays the buffer out itself (engine.data.collate._layout): every tensor inside the buffer, none
    # overlapping another, each at a multiple of its item size, and the label lists of every segment and
    # attribute back to back at the end (no scratch space left in the bytes a batch travels in).
    data = random_data(6, K=(2, 3, 1))
    users = np.random.default_rng(6).choice(data.num_users, 17, replace=False)
    packed = Collator(data, [0, 10], CollateConfig(select_prob=select_prob)).packed(users, seed=4)
    Ks, _, entries = packed.spec
    spans = sorted((o, o + int(np.prod(shape)) * dtype.itemsize) for dtype, shape, o in entries)
    assert all(o % dtype.itemsize == 0 for dtype, _, o in entries)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "tensors overlap"
    assert spans[-1][1] == packed.buffer.numel()
    label_lists, i = [], 3
    for k in Ks:
        label_lists += entries[i + 6 + k:i + 6 + 2 * k]
        i += 6 + 2 * k
    for (_, shape, o), (_, _, nxt) in zip(label_lists, label_lists[1:]):
        assert o + shape[0] * 4 == nxt
    assert label_lists[-1][2] + label_lists[-1][1][0] * 4 == packed.buffer.numel()


def test_labels_stay_distinct_when_the_word_stamps_wrap():
    # The stamp table holds 16-bit stamps, one per masked word, cleared when they run out: a batch with
    # more than 65,535 masked words crosses that point.
    data = random_data(7, n_users=300, K=(2,), max_words=500)
    batch = Collator(data, [0, 10], CollateConfig(select_prob=1.0))(np.arange(300), seed=1)
    sb = batch.segments[0]
    assert len(sb.masked) > 70_000
    offs, attr = sb.word_offsets.numpy(), sb.attr_ids.numpy()
    for k in range(2):
        lo, li = sb.label_offsets[k].numpy(), sb.label_ids[k].numpy()
        for m in list(range(65_530, 65_545)) + [len(sb.masked) - 1]:
            w = sb.masked[m].item()
            assert li[lo[m]:lo[m + 1]].tolist() == list(dict.fromkeys(v for v in attr[offs[w]:offs[w + 1], k]
                                                                      .tolist() if v != 0))


def test_unpack_reads_a_buffer_that_starts_inside_its_storage():
    # Views are taken relative to the buffer, wherever it starts in its storage.
    data = random_data(8)
    packed = Collator(data, [0, 10])(np.arange(12), seed=3)
    packed = pack_batch(packed)
    shifted = torch.zeros(64 + packed.buffer.numel(), dtype=torch.uint8)
    shifted[64:] = packed.buffer
    back = unpack_batch(type(packed)(shifted[64:], packed.spec))
    for x, y in zip(flat_tensors(unpack_batch(packed)), flat_tensors(back), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_rows_outside_the_data_are_refused():
    data = random_data(9)
    collator = Collator(data, [0, 10])
    for bad in ([0, 40], [-1, 3]):
        with pytest.raises(IndexError, match="user rows must lie in"):
            collator(np.array(bad), seed=0)
