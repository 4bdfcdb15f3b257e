"""Data loading: a deterministic plan of user batches, collated in loader workers.

The plan is a pure function of (seed, epoch, rank, world_size): step ``i`` always sees the same
users and the same masks, which is what lets a resumed run reproduce an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.batch import Batch
from engine.collate import Collator

_MIX = 1_000_003


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The masking seed of one batch (fits Numba's 32-bit seeding)."""
    return ((seed * _MIX + epoch) * _MIX + index) % (2**31 - 1)


def epoch_plan(n_users: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               drop_last: bool = True, shuffle: bool = True) -> list[np.ndarray]:
    """This rank's user batches for one epoch.

    All ranks draw the same permutation and take disjoint, equal-sized slices of each global batch,
    so a global batch of ``batch_size * world_size`` users is split with nothing seen twice.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_users) if shuffle else np.arange(n_users)
    global_batch = batch_size * world_size
    n_batches = n_users // global_batch if drop_last else -(-n_users // global_batch)
    plan = []
    for i in range(n_batches):
        chunk = order[i * global_batch:(i + 1) * global_batch]
        plan.append(chunk[rank::world_size][:batch_size] if world_size > 1 else chunk)
    return plan


class _PlannedBatches(Dataset):
    """A map-style dataset whose items are whole batches, so workers run collate in parallel."""

    def __init__(self, collator: Collator, plan: list[np.ndarray], seeds: list[int]):
        self.collator, self.plan, self.seeds = collator, plan, seeds

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Batch:
        return self.collator(self.plan[i], self.seeds[i])


def pretrain_batches(collator: Collator, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                     world_size: int = 1, workers: int = 0, pin_memory: bool = False,
                     users: np.ndarray | None = None) -> Iterator[tuple[int, Batch]]:
    """Endless (step, Batch) pairs from ``start_step`` on, epoch after epoch.

    ``users``: restrict training to these dataset rows (default: every user).
    """
    rows = np.arange(collator.data.num_users) if users is None else np.asarray(users, dtype=np.int64)
    per_epoch = len(epoch_plan(len(rows), batch_size, seed, 0, rank, world_size))
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} users cannot fill one batch of {batch_size} x {world_size} ranks")
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        plan = [rows[b] for b in epoch_plan(len(rows), batch_size, seed, epoch, rank, world_size)][index:]
        seeds = [batch_seed(seed, epoch, i) for i in range(index, per_epoch)]
        loader = DataLoader(_PlannedBatches(collator, plan, seeds), batch_size=None, shuffle=False,
                            num_workers=workers, pin_memory=pin_memory,
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        for batch in loader:
            yield step, batch
            step += 1


def eval_batches(collator: Collator, users: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Batches over ``users`` in order, nothing dropped (for evaluation and embedding export)."""
    users = np.asarray(users, dtype=np.int64)
    for i in range(0, len(users), batch_size):
        yield collator(users[i:i + batch_size], seed=0)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return batch if device.type == "cpu" else batch.to(device, non_blocking=True)
