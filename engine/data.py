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


GROUP_BATCHES = 64  # length grouping sorts windows of this many global batches


def epoch_plan(n_users: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
               drop_last: bool = True, shuffle: bool = True, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """This rank's user batches for one epoch (indices into ``range(n_users)``).

    All ranks draw the same permutation and take disjoint, equal-sized slices of each global batch,
    so a global batch of ``batch_size * world_size`` users is split with nothing seen twice.

    ``lengths``: group users of similar sequence length (as HF's LengthGroupedSampler does).  The
    grid is padded to the batch's longest user, and behaviour histories are heavy-tailed: on the
    synthetic demo data random batches of 32 are 68% padding.  Sorting each window of
    GROUP_BATCHES random batches by length, then shuffling the batches, keeps batches random across
    the epoch while cutting that waste to a few percent.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_users) if shuffle else np.arange(n_users)
    global_batch = batch_size * world_size
    n_batches = n_users // global_batch if drop_last else -(-n_users // global_batch)
    if lengths is not None and shuffle:
        window = GROUP_BATCHES * global_batch
        for start in range(0, n_users, window):
            chunk = order[start:start + window]
            order[start:start + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batch_order = rng.permutation(n_batches)
    else:
        batch_order = np.arange(n_batches)
    plan = []
    for i in batch_order:
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


def sequence_lengths(collator: Collator, rows: np.ndarray) -> np.ndarray:
    """Tokens per user (without CLS and user attributes, which every user has)."""
    return sum(np.diff(s.user_word_offsets)[rows] for s in collator.data.segments)


def pretrain_batches(collator: Collator, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                     world_size: int = 1, workers: int = 0, pin_memory: bool = False,
                     users: np.ndarray | None = None, group_by_length: bool = True) -> Iterator[tuple[int, Batch]]:
    """Endless (step, Batch) pairs from ``start_step`` on, epoch after epoch.

    ``users``: restrict training to these dataset rows (default: every user).
    """
    rows = np.arange(collator.data.num_users) if users is None else np.asarray(users, dtype=np.int64)
    lengths = sequence_lengths(collator, rows) if group_by_length else None
    per_epoch = len(epoch_plan(len(rows), batch_size, seed, 0, rank, world_size))
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} users cannot fill one batch of {batch_size} x {world_size} ranks")
    step = start_step
    while True:
        epoch, index = divmod(step, per_epoch)
        plan = [rows[b] for b in epoch_plan(len(rows), batch_size, seed, epoch, rank, world_size,
                                            lengths=lengths)][index:]
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
