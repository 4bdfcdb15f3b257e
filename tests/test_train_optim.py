"""The optimizer side of training (engine/train/optim.py): the learning-rate schedule."""

import pytest

from engine.train.optim import lr_factor


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == 1.0
    assert lr_factor(10, 100, 10, "linear") == 1.0
    assert lr_factor(100, 100, 10, "linear") == 0.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
