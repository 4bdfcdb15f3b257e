"""Resume checkpoints: which one is the latest, pruning, and our pickle-free optimizer and RNG state."""

import json
import random

import numpy as np
import torch

from engine.train.checkpoints import (
    STATE_FILE,
    complete_checkpoints,
    latest_checkpoint,
    load_optimizer,
    load_rng,
    load_scheduler,
    prune,
    read_state,
    save_optimizer,
    save_rng,
    save_scheduler,
    tag_for,
    write_state,
)
from engine.train.optim import lr_factor


def _make(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        write_state(d, {"step": step})
    return d


def test_latest_skips_incomplete_and_prune_keeps_k(tmp_path):
    for s in (10, 20, 30):
        _make(tmp_path, s)
    _make(tmp_path, 40, complete=False)  # a save that was killed half-way
    _make(tmp_path, 5, complete=False)
    assert latest_checkpoint(tmp_path).name == tag_for(30)
    removed = prune(tmp_path, keep=2)
    assert {d.name for d in removed} == {tag_for(10), tag_for(5)}
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert (tmp_path / tag_for(40)).exists()  # newer than the latest complete one: maybe being written now
    assert read_state(tmp_path / tag_for(30))["step"] == 30
    assert latest_checkpoint(tmp_path / "nothing") is None


def _trained_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.1},
                             {"params": list(model[1].parameters()) + list(model[2].parameters()),
                              "weight_decay": 0.0}], lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 20, 3, "cosine"))
    for _ in range(4):
        model(torch.randn(6, 5)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_optimizer_and_scheduler_round_trip_without_pickle(tmp_path):
    model, opt, sched = _trained_optimizer(0)
    save_optimizer(tmp_path, opt)
    save_scheduler(tmp_path, sched)
    assert (tmp_path / "optimizer.safetensors").read_bytes()[:2] != b"\x80\x04"  # not a pickle
    json.loads((tmp_path / "optimizer.json").read_text())
    model2, opt2, sched2 = _trained_optimizer(1)
    model2.load_state_dict(model.state_dict())
    load_optimizer(tmp_path, opt2)
    load_scheduler(tmp_path, sched2)
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    x = torch.randn(6, 5)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(x).pow(2).sum().backward()
        o.step()
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)


def test_rng_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    save_rng(tmp_path, rank=1)
    want = (torch.rand(3), np.random.rand(2), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    load_rng(tmp_path, rank=1)
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert (tmp_path / "rng_rank00001.safetensors").exists() and not (tmp_path / STATE_FILE).exists()
