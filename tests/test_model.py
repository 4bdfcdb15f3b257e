"""UserBERT on a tiny VocabSpec and hand-built Batches (independent of engine/data/collate.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.config import MaskingConfig, ModelConfig, SegmentVocab, VocabSpec
from engine.data.batch import Batch, SegmentBatch
from engine.model.userbert import UserBERT, user_attr_offsets

# ------------------------------------------------------------------------------------------------
# A tiny spec, and users/batches built by hand following docs/FORMATS.md §5
# ------------------------------------------------------------------------------------------------


def tiny_spec(user_attrs: bool = True) -> VocabSpec:
    return VocabSpec(
        segments=[
            # sum(dims) = 16 != hidden: goes through the projection
            SegmentVocab("long", ["action", "shop", "genre"], [5, 37, 11], [3, 8, 5],
                         num_positions=30, max_words=6),
            # sum(dims) = 24 == hidden: no projection
            SegmentVocab("short", ["action", "shop"], [4, 29], [8, 16], num_positions=50, max_words=7),
        ],
        user_attributes=["gender", "age"] if user_attrs else [],
        user_vocab_sizes=[4, 9] if user_attrs else [],
    )


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(hidden=24, layers=2, heads=4, dropout=0.0, attn_dropout=0.0, kernel_impl="torch")
    return ModelConfig(**{**base, **kw})


def make_user(spec: VocabSpec, n_words: list[int], seed: int, max_actions: int = 4) -> dict:
    """One user's content: per segment a list of words (position, [n_actions, K] ids), user attribute
    ids, and which words are masked/zeroed (drawn as docs/FORMATS.md §5 says)."""
    rng = np.random.default_rng(seed)
    segs = []
    for sv, n in zip(spec.segments, n_words):
        pos = np.sort(rng.integers(0, sv.num_positions, n))
        words = []
        for p in pos:
            n_act = int(rng.integers(1, max_actions + 1))
            words.append((int(p), np.stack([rng.integers(1, v, n_act) for v in sv.vocab_sizes], axis=1)))
        segs.append(words)
    ua = [int(rng.integers(1, v)) for v in spec.user_vocab_sizes]
    all_words = [(s, j) for s, n in enumerate(n_words) for j in range(n)]
    n_mask = max(1, round(0.15 * len(all_words))) if all_words else 0
    picked = [all_words[i] for i in rng.choice(len(all_words), n_mask, replace=False)] if n_mask else []
    masked = {w: bool(rng.random() < 0.8) for w in picked}  # (segment, word) -> zeroed?
    return {"segments": segs, "user_attrs": ua, "masked": masked}


def make_batch(spec: VocabSpec, users: list[dict], pad_to: int | None = None) -> Batch:
    B, U = len(users), len(spec.user_attributes)
    seq_lens = [1 + U + sum(len(w) for w in u["segments"]) for u in users]
    T = max(seq_lens) if pad_to is None else pad_to
    offsets = user_attr_offsets(spec)
    seg_batches = []
    for s, sv in enumerate(spec.segments):
        attr, lens, pos, slot, masked, zero = [], [], [], [], [], []
        for b, u in enumerate(users):
            t = 1 + U + sum(len(u["segments"][r]) for r in range(s))  # segments follow each other
            for j, (p, ids) in enumerate(u["segments"][s]):
                if (s, j) in u["masked"]:
                    masked.append(len(pos))
                    zero.append(u["masked"][(s, j)])
                attr.append(ids)
                lens.append(len(ids))
                pos.append(p)
                slot.append(b * T + t + j)
        K = len(sv.attributes)
        attr_ids = np.concatenate(attr) if attr else np.zeros((0, K), np.int64)
        word_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        label_offsets, label_ids = [], []
        for k in range(K):
            sets = [np.unique(attr[w][:, k]) for w in masked]  # distinct values, ascending
            label_offsets.append(torch.tensor(np.concatenate([[0], np.cumsum([len(x) for x in sets])]),
                                              dtype=torch.int32))
            label_ids.append(torch.tensor(np.concatenate(sets) if sets else [], dtype=torch.int32))
        seg_batches.append(SegmentBatch(
            attr_ids=torch.tensor(attr_ids, dtype=torch.int32).reshape(-1, K),
            word_offsets=torch.tensor(word_offsets),
            word_pos=torch.tensor(pos, dtype=torch.int32),
            word_slot=torch.tensor(slot, dtype=torch.int64),
            masked=torch.tensor(masked, dtype=torch.int64),
            masked_zero=torch.tensor(zero, dtype=torch.bool),
            label_offsets=label_offsets,
            label_ids=label_ids,
        ))
    ua = torch.tensor([[o + i for o, i in zip(offsets, u["user_attrs"])] for u in users],
                      dtype=torch.int32).reshape(B, U)
    return Batch(segments=seg_batches, user_attr_ids=ua, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                 max_len=T, users=torch.arange(B))


def random_users(spec, n_users, seed, max_words=(6, 7)):
    rng = np.random.default_rng(seed)
    return [make_user(spec, [int(rng.integers(0, m + 1)) for m in max_words], seed * 1000 + b)
            for b in range(n_users)]


MASK = MaskingConfig()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spin-waits made these tests ~20x slower (measured: 12 ms vs 100-450 ms per training step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_user_attr_offsets():
    assert user_attr_offsets(tiny_spec()) == [0, 4]
    assert user_attr_offsets(tiny_spec(user_attrs=False)) == []


def test_shapes_loss_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    spec = tiny_spec()
    users = random_users(spec, 5, seed=1)
    users[0] = make_user(spec, [6, 7], seed=99)  # at least one user with words in both segments
    users[0]["masked"] = {(0, 1): True, (0, 2): False, (1, 3): True, (1, 0): False}
    batch = make_batch(spec, users)
    model = UserBERT(tiny_cfg(), spec)

    hidden = model.encode(batch)
    assert hidden.shape == (5, batch.max_len, 24)
    assert model.user_embedding(batch).shape == (5, 24)

    loss, stats = model.pretrain_loss(batch, MASK)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    names = {f"loss/{s.name}.{a}" for s in spec.segments for a in s.attributes}
    assert set(stats) == names | {"masked_words"}
    assert stats["masked_words"] == sum(sb.masked.numel() for sb in batch.segments)
    assert all(np.isfinite(v) and v > 0 for k, v in stats.items())

    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    for seg in model.embeddings.segments:
        for a, emb in seg.attr.items():
            assert (emb.weight.grad[0] == 0).all(), f"{seg.name}.{a}: padding row got a gradient"
            assert (emb.weight[0] == 0).all(), f"{seg.name}.{a}: padding row not zero at init"


def test_padding_and_batch_composition_do_not_change_real_tokens():
    spec = tiny_spec()
    model = UserBERT(tiny_cfg(dropout=0.1, attn_dropout=0.1), spec).eval()
    users = random_users(spec, 4, seed=2)
    users[0] = make_user(spec, [1, 2], seed=7)  # short: lots of padding next to the others
    users[1] = make_user(spec, [6, 7], seed=8)
    with torch.no_grad():
        alone = model.encode(make_batch(spec, users[:1]))[0]  # [T0, H], no padding at all
        together = model.encode(make_batch(spec, users))  # padded to the longest user
        extra_pad = model.encode(make_batch(spec, users, pad_to=40))
    n0 = alone.shape[0]
    torch.testing.assert_close(together[0, :n0], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra_pad[:, : together.shape[1]], together, rtol=1e-5, atol=1e-5)

    # Garbage in the padded slots of the embedded grid must not reach any real token.
    batch = make_batch(spec, users)
    real = batch.padding_mask()

    def scramble(module, inputs, out):
        noise = torch.randn_like(out) * 10
        return torch.where(real[..., None], out, noise)

    with torch.no_grad():
        clean = model.encode(batch)
        handle = model.embeddings.register_forward_hook(scramble)
        try:
            noisy = model.encode(batch)
        finally:
            handle.remove()
    torch.testing.assert_close(noisy[real], clean[real], rtol=1e-5, atol=1e-5)


def test_zeroed_masked_words_keep_only_position_and_segment():
    spec = tiny_spec()
    model = UserBERT(tiny_cfg(), spec).eval()
    users = [make_user(spec, [5, 6], seed=s) for s in (3, 4)]
    for u in users:
        u["masked"] = {(0, 1): True, (0, 3): False, (1, 0): True, (1, 4): False}
    batch = make_batch(spec, users)
    emb = model.embeddings
    with torch.no_grad():
        grid = emb.grid(batch).reshape(-1, 24)  # [B*T, H]
        for s, sb in enumerate(batch.segments):
            # [n_words, H]: what a zeroed word must be left with
            pos_seg = emb.segments[s].position.weight[sb.word_pos.long()] + emb.segment.weight[s]
            at = grid[sb.word_slot]  # [n_words, H]
            zeroed = sb.masked[sb.masked_zero]
            kept = sb.masked[~sb.masked_zero]
            assert zeroed.numel() == 2 and kept.numel() == 2
            torch.testing.assert_close(at[zeroed], pos_seg[zeroed], rtol=0, atol=0)
            assert ((at[kept] - pos_seg[kept]).abs().amax(dim=1) > 1e-4).all(), "kept words lost their vector"

        # Rewriting the zeroed words' actions changes nothing; rewriting a kept word does.
        for s, sb in enumerate(batch.segments):
            changed = dataclasses.replace(sb, attr_ids=sb.attr_ids.clone())
            for w in sb.masked[sb.masked_zero].tolist():
                a0, a1 = int(sb.word_offsets[w]), int(sb.word_offsets[w + 1])
                changed.attr_ids[a0:a1] = 1
            segs = list(batch.segments)
            segs[s] = changed
            assert torch.equal(emb.grid(dataclasses.replace(batch, segments=segs)).reshape(-1, 24), grid)
            w = int(sb.masked[~sb.masked_zero][0])
            changed.attr_ids[int(sb.word_offsets[w])] = 1
            assert not torch.equal(emb.grid(dataclasses.replace(batch, segments=segs)).reshape(-1, 24), grid)


def test_loss_decreases_with_adam():
    torch.manual_seed(0)
    spec = tiny_spec()
    batch = make_batch(spec, random_users(spec, 6, seed=5))
    model = UserBERT(tiny_cfg(), spec)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model.pretrain_loss(batch, MASK)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_reduction_and_normalization():
    spec = tiny_spec()
    model = UserBERT(tiny_cfg(), spec)
    batch = make_batch(spec, random_users(spec, 4, seed=6))
    mean, stats = model.pretrain_loss(batch, MaskingConfig(loss_reduction="mean"))
    total, _ = model.pretrain_loss(batch, MaskingConfig(loss_reduction="sum"))
    torch.testing.assert_close(total, mean * stats["masked_words"])
    # stats are per-head means over the segment's masked words: weight them back into the total.
    per_seg = {sv.name: sb.masked.numel() for sv, sb in zip(spec.segments, batch.segments)}
    from_stats = sum(v * per_seg[k[5:].split(".")[0]] for k, v in stats.items() if k.startswith("loss/"))
    assert abs(from_stats - total.item()) < 1e-3 * total.item()
    # sum_y (lse - z_y) = |Y| * (lse - mean_y z_y) >= the normalised loss (every loss_m >= 0)
    unnorm, _ = model.pretrain_loss(batch, MaskingConfig(normalize_labels=False, loss_reduction="sum"))
    assert unnorm.item() >= total.item()


def test_no_user_attributes_empty_segment_and_nothing_masked():
    spec = tiny_spec(user_attrs=False)
    model = UserBERT(tiny_cfg(), spec)
    users = [make_user(spec, [3, 0], seed=s) for s in (10, 11)]  # no short-term words at all
    users.append(make_user(spec, [0, 0], seed=12))  # a user with no words: CLS only
    batch = make_batch(spec, users)
    assert batch.segments[1].n_words == 0 and batch.user_attr_ids.shape == (3, 0)
    loss, stats = model.pretrain_loss(batch, MASK)
    assert torch.isfinite(loss) and stats["loss/short.shop"] == 0.0
    loss.backward()
    assert model.heads.heads["short"]["shop"].weight.grad is not None  # still connected (zero)

    nothing = make_batch(spec, [make_user(spec, [0, 0], seed=13)])
    loss, stats = model.pretrain_loss(nothing, MASK)
    assert loss.item() == 0.0 and stats["masked_words"] == 0.0


def test_bf16_model_runs():
    spec = tiny_spec()
    model = UserBERT(tiny_cfg(), spec).to(torch.bfloat16)
    batch = make_batch(spec, random_users(spec, 3, seed=14))
    loss, _ = model.pretrain_loss(batch, MASK)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_triton_impl_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = tiny_spec()
    model = UserBERT(tiny_cfg(kernel_impl="triton"), spec)
    batch = make_batch(spec, random_users(spec, 2, seed=15))
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors.*impl='torch' or impl='auto'"):
        model.pretrain_loss(batch, MASK)


@pytest.mark.parametrize("backward", ["atomic", "sorted"])
def test_triton_kernels_match_torch_in_the_model(monkeypatch, backward):
    """kernel_impl="triton" (under the interpreter here) against "torch": same loss, same gradients,
    through both segments (one with the projection, one with the fused position + segment add)."""
    from kernels.dispatch import interpreter_enabled, triton_importable

    if not (triton_importable() and interpreter_enabled()):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (set by the root conftest.py)")
    import kernels.gather_concat_mean as gcm

    monkeypatch.setattr(gcm, "DEFAULT_BACKWARD", backward)
    torch.manual_seed(0)
    spec = tiny_spec()
    ref_model = UserBERT(tiny_cfg(), spec)
    model = UserBERT(tiny_cfg(kernel_impl="triton"), spec)
    model.load_state_dict(ref_model.state_dict())
    users = random_users(spec, 4, seed=21)
    users[0] = make_user(spec, [6, 7], seed=22)
    batch = make_batch(spec, users)
    for norm in (True, False):
        masking = MaskingConfig(normalize_labels=norm)
        loss_ref, stats_ref = ref_model.pretrain_loss(batch, masking)
        loss, stats = model.pretrain_loss(batch, masking)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        assert stats.keys() == stats_ref.keys()
        for k in stats:
            assert abs(stats[k] - stats_ref[k]) <= 1e-5 * max(1.0, abs(stats_ref[k])), k
        ref_model.zero_grad()
        model.zero_grad()
        loss_ref.backward()
        loss.backward()
        for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
