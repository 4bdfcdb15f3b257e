"""Data loading: a deterministic plan of user batches, collated by loader threads.

The plan is a pure function of (seed, epoch, rank, world_size): step ``i`` always sees the same
users and the same masks, which is what lets a resumed run reproduce an uninterrupted one.

Training (:class:`TrainBatches`, :class:`TrainLoader`) splits each global batch of B users into
``world_size x accumulation`` micro-batches of ``micro_batch`` users.  Micro-batch ``a`` of rank
``r`` is slot ``v = a * world_size + r`` of the global batch (every ``n_slots``-th user from ``v``,
so length-grouped batches split evenly), masked with ``batch_seed(seed, epoch, i * n_slots + v)``.
The slots depend only on their number: 1 rank x 2 accumulation steps sees exactly the users and
masks of 2 ranks x 1 step.  With one slot this is :func:`pretrain_batches`' plan, seed for seed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.batch import Batch, PackedBatch, unpack_batch
from engine.data.collate import Collator

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
    global_batch = batch_size * world_size
    return [chunk[rank::world_size][:batch_size] if world_size > 1 else chunk
            for chunk in global_batches(n_users, global_batch, seed, epoch, drop_last, shuffle, lengths)]


def global_batches(n_users: int, global_batch: int, seed: int, epoch: int, drop_last: bool = True,
                   shuffle: bool = True, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's global batches (every rank computes the same list; see :func:`epoch_plan`)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_users) if shuffle else np.arange(n_users)
    n_batches = n_users // global_batch if drop_last else -(-n_users // global_batch)
    if lengths is not None and shuffle:
        window = GROUP_BATCHES * global_batch
        for start in range(0, n_users, window):
            chunk = order[start:start + window]
            order[start:start + window] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batch_order = rng.permutation(n_batches)
    else:
        batch_order = np.arange(n_batches)
    return [order[i * global_batch:(i + 1) * global_batch] for i in batch_order]


def sequence_lengths(collator: Collator, rows: np.ndarray) -> np.ndarray:
    """Tokens per user (without CLS and user attributes, which every user has)."""
    return sum(np.diff(s.user_word_offsets)[rows] for s in collator.data.segments)


def pretrain_batches(collator: Collator, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                     world_size: int = 1, users: np.ndarray | None = None,
                     group_by_length: bool = True) -> Iterator[tuple[int, Batch]]:
    """Endless (step, Batch) pairs from ``start_step`` on, epoch after epoch (the plan of one slot per
    step, collated in order; :class:`TrainLoader` collates the same plan ahead in threads).

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
        for i, users_ in enumerate(plan, start=index):
            yield step, collator(users_, batch_seed(seed, epoch, i))
            step += 1


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch of users is split: global = micro x accumulation x world."""

    global_batch: int
    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def n_slots(self) -> int:
        return self.accumulation * self.world_size


def batch_layout(global_batch: int, world_size: int, micro_batch: int = 0, accumulation: int = 0,
                 where: str = "train") -> BatchLayout:
    """Derive micro-batch and accumulation steps from the global batch and the world size.

    ``micro_batch`` / ``accumulation``: 0 to derive.  Neither given: one micro-batch per rank per
    step (no accumulation).  Raises ValueError, naming the numbers, when they cannot fit.
    """
    if global_batch % world_size:
        raise ValueError(f"{where}.batch_size = {global_batch} users is not divisible by the world size "
                         f"{world_size}: every rank must take the same share of a global batch")
    per_rank = global_batch // world_size
    if micro_batch and accumulation:
        if micro_batch * accumulation != per_rank:
            raise ValueError(f"{where}: batch_size {global_batch} != micro_batch_size {micro_batch} x gradient "
                             f"accumulation {accumulation} x world size {world_size}")
    elif micro_batch:
        if per_rank % micro_batch:
            raise ValueError(f"{where}: batch_size {global_batch} / world size {world_size} = {per_rank} users per "
                             f"rank, not a multiple of micro_batch_size {micro_batch}")
        accumulation = per_rank // micro_batch
    elif accumulation:
        if per_rank % accumulation:
            raise ValueError(f"{where}: batch_size {global_batch} / world size {world_size} = {per_rank} users per "
                             f"rank, not divisible into {accumulation} accumulation steps")
        micro_batch = per_rank // accumulation
    else:
        micro_batch, accumulation = per_rank, 1
    return BatchLayout(global_batch, micro_batch, accumulation, world_size)


class TrainBatches(Dataset):
    """Map-style dataset of one rank's micro-batches, item ``k`` = micro-batch ``k % A`` of step
    ``start_step + k // A``, epoch after epoch.  An epoch's plan is computed when first needed (a pure
    function, so every rank agrees without talking)."""

    def __init__(self, collator: Collator, layout: BatchLayout, rank: int, seed: int, start_step: int,
                 end_step: int, rows: np.ndarray | None = None, group_by_length: bool = True):
        self.collator, self.layout, self.rank, self.seed = collator, layout, rank, seed
        self.start_step, self.end_step = start_step, end_step
        self.rows = np.arange(collator.data.num_users) if rows is None else np.asarray(rows, dtype=np.int64)
        self.lengths = sequence_lengths(collator, self.rows) if group_by_length else None
        self.per_epoch = len(self.rows) // layout.global_batch
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.rows)} users cannot fill one global batch of {layout.global_batch}")
        self._epoch, self._batches = -1, []

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.layout.accumulation

    def locate(self, k: int) -> tuple[int, int, int, int]:
        """(step, epoch, index in epoch, slot) of item ``k``."""
        step, micro = divmod(k, self.layout.accumulation)
        step += self.start_step
        epoch, index = divmod(step, self.per_epoch)
        return step, epoch, index, micro * self.layout.world_size + self.rank

    def users(self, k: int) -> tuple[np.ndarray, int]:
        """Dataset rows and masking seed of item ``k``."""
        _, epoch, index, slot = self.locate(k)
        if epoch != self._epoch:
            self._batches = global_batches(len(self.rows), self.layout.global_batch, self.seed, epoch,
                                           lengths=self.lengths)
            self._epoch = epoch
        n = self.layout.n_slots
        chunk = self._batches[index][slot::n][:self.layout.micro_batch]
        return self.rows[chunk], batch_seed(self.seed, epoch, index * n + slot)

    def __getitem__(self, k: int) -> Batch:
        return self.collator(*self.users(k))


def auto_workers(requested: int, device: torch.device, local_world_size: int = 1) -> int:
    """-1: up to 4 collate threads per rank on GPU (bounded by the CPUs per local rank, one left for the
    trainer); 0 on CPU, where collating on the training thread is cheaper than competing for cores."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, local_world_size) - 1))


class TrainLoader:
    """Iterates a rank's micro-batches, collated ahead by ``workers`` threads, and times how long the
    trainer waits for each batch (``data_wait_s``, reset by :meth:`take_wait`).

    Threads, not processes: collate is Numba code that releases the GIL, so threads run it in parallel,
    and a batch (one buffer, :meth:`Collator.packed`) reaches the trainer without being copied into
    shared memory — which costs more than collating it (measured: 11 ms to share a 7 MB paper-max
    batch of 256 users; docs/bench/throughput.md).  On a GPU the buffer is pinned by its thread and
    crosses to the device in one copy; the batch is views of it.  Batches come out in order and are a
    pure function of the plan, whatever the number of threads.
    """

    def __init__(self, dataset: TrainBatches, workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4,
                 device: torch.device | None = None):
        self.dataset = dataset
        self.workers = workers
        self.ahead = max(1, workers * prefetch_factor)  # batches submitted but not yet taken
        self.device = device if device is not None and device.type == "cuda" else None
        self.pin = pin_memory and self.device is not None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._submitted = self._taken = 0
        self.wait_s = 0.0

    def _collate(self, users: np.ndarray, seed: int) -> PackedBatch:
        packed = self.dataset.collator.packed(users, seed)
        return packed.pin_memory() if self.pin else packed

    def __iter__(self) -> TrainLoader:
        self.close()
        self._submitted = self._taken = 0
        if self.workers > 0:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="userbert-collate")
        return self

    def __next__(self) -> Batch:
        t = time.perf_counter()
        n = len(self.dataset)
        if self._taken >= n:
            raise StopIteration
        if self._pool is None:
            packed = self._collate(*self.dataset.users(self._taken))
        else:
            while self._submitted < min(n, self._taken + self.ahead):
                self._pending.append(self._pool.submit(self._collate, *self.dataset.users(self._submitted)))
                self._submitted += 1
            packed = self._pending.popleft().result()
        self._taken += 1
        if self.device is not None:
            packed = PackedBatch(packed.buffer.to(self.device, non_blocking=self.pin), packed.spec)
        batch = unpack_batch(packed)
        self.wait_s += time.perf_counter() - t
        return batch

    def take_wait(self) -> float:
        w, self.wait_s = self.wait_s, 0.0
        return w

    def close(self) -> None:
        """Stops the threads now (a batch being collated finishes; queued ones are dropped)."""
        pool, self._pool = self._pool, None
        self._pending.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(collator: Collator, users: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Batches over ``users`` in order, nothing dropped (for evaluation and embedding export)."""
    users = np.asarray(users, dtype=np.int64)
    for i in range(0, len(users), batch_size):
        yield collator(users[i:i + batch_size], seed=0)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return batch if device.type == "cpu" else batch.to(device, non_blocking=True)
