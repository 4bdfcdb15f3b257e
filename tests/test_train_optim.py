"""The optimizer side of training (engine/train/optim.py): weight decay by parameter role, the same rule for
both phases, and the learning-rate schedule."""

import pytest
import torch.nn as nn

from engine.config import ModelConfig, SegmentVocab, VocabSpec
from engine.model.userbert import UserBERT
from engine.train.optim import build_optimizer, lr_factor, weight_decay_mask


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == 1.0
    assert lr_factor(10, 100, 10, "linear") == 1.0
    assert lr_factor(100, 100, 10, "linear") == 0.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)


def _model() -> UserBERT:
    spec = VocabSpec(
        segments=[SegmentVocab("long", ["action", "genre"], [5, 11], [3, 5], num_positions=30, max_words=6)],
        user_attributes=["age"], user_vocab_sizes=[9])
    return UserBERT(ModelConfig(hidden=16, layers=1, heads=2, kernel_impl="torch"), spec)  # 3 + 5 != 16: a proj


def test_linear_weights_decay_and_nothing_else():
    model = _model()
    mask = weight_decay_mask(model)
    named = dict(model.named_parameters())
    assert set(mask) == {id(p) for p in named.values()}  # every parameter has a decision
    decayed = {n for n, p in named.items() if mask[id(p)]}
    # the segment's dense projection decays, although its name contains "emb"
    assert "embeddings.segments.0.proj.weight" in decayed
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.blocks.0.mlp.fc.weight" in decayed
    assert any(n.startswith("heads.") and n.endswith(".weight") for n in decayed)
    modules = dict(model.named_modules())
    for n in named:
        owner = modules[n.rpartition(".")[0]]
        assert (n in decayed) == (isinstance(owner, nn.Linear) and n.endswith(".weight")), n
    # embedding tables, LayerNorms, biases and the CLS vector do not
    assert "embeddings.segments.0.attr.genre.weight" not in decayed and "embeddings.cls" not in decayed
    assert not any("norm" in n or n.endswith(".bias") for n in decayed)


def test_build_optimizer_groups_follow_the_rule():
    model = _model()
    opt = build_optimizer(model, 1e-3, (0.9, 0.999), weight_decay=0.1)
    mask = weight_decay_mask(model)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay[0.1] == {i for i, d in mask.items() if d}
    assert by_decay[0.0] == {i for i, d in mask.items() if not d}
