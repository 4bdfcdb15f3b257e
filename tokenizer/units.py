"""Units of the words pass: which spill partitions and shards each unit covers, sized by the memory model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokenizer.partition import Unit
from tokenizer.plan import PHASE2_EXTRA, PHASE2_FACTOR


def plan_units(
    spills: list[tuple[Path, np.ndarray]], part_bits: int, shard_bits: int, own: tuple[int, int], budget: int,
    n_codes: list[int],
) -> list[Unit]:
    """Units covering the shards ``own`` = [first, stop), each within ``budget`` bytes if it can be.

    Partitions and shards are both ranges of the top bits of the user hash (P = 2**part_bits,
    S = 2**shard_bits).  P >= S: a unit is a shard and reads P/S partitions.  P < S: a unit is
    a partition and writes its S/P shards, or, when that is too much for the budget (or the
    partition straddles another job's shards), a run of them, skipping the other rows.
    """
    n_parts = 1 << part_bits
    n_shards = 1 << shard_bits
    spill_bytes = np.zeros(n_parts, np.int64)
    spill_rows = np.zeros(n_parts, np.int64)
    width = np.array(n_codes + [0], np.int64)
    for _, index in spills:
        if len(index):
            rows = index[index[:, 0] < len(n_codes)]  # events only: the user table is small
            nbytes = rows[:, 3] * (8 + 4 * width[rows[:, 0]]) + rows[:, 4]
            np.add.at(spill_bytes, rows[:, 1], nbytes)
            np.add.at(spill_rows, rows[:, 1], rows[:, 3])
    work_bytes = (spill_bytes * PHASE2_FACTOR + PHASE2_EXTRA * spill_rows).astype(np.int64)
    units: list[Unit] = []
    first, stop = own
    if n_parts >= n_shards:
        per = n_parts // n_shards
        for s in range(first, stop):
            units.append(Unit(len(units), (s * per, (s + 1) * per), (s, s + 1), False,
                              int(work_bytes[s * per : (s + 1) * per].sum())))
        return units
    per = n_shards // n_parts
    for p in range(n_parts):
        lo, hi = max(first, p * per), min(stop, (p + 1) * per)
        if lo >= hi:
            continue
        whole = lo == p * per and hi == (p + 1) * per
        share = int(work_bytes[p]) * (hi - lo) // per
        if whole and work_bytes[p] <= budget:
            units.append(Unit(len(units), (p, p + 1), (lo, hi), False, int(work_bytes[p])))
            continue
        group = max(1, min(hi - lo, int(budget * per // max(1, int(work_bytes[p])))))
        for g in range(lo, hi, group):
            units.append(Unit(len(units), (p, p + 1), (g, min(hi, g + group)), True,
                              share * (min(hi, g + group) - g) // max(1, hi - lo)))
    return units
