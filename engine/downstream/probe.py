"""How much a frozen user embedding knows: linear probes and kNN, against the same on counts.

The product of pretraining is the embedding `userbert-engine embed` exports (engine/downstream/user_embeddings.py).
This scores it frozen, next to the bag of counts a user would otherwise feed their own models:

- feature sets: ``embedding`` (the exported vector, standardised on the training users), ``counts``
  (the logistic-regression baseline's bag-of-attribute features, engine/downstream/baselines.py),
  ``counts+embedding`` (both side by side: does the embedding add anything to counting?);
- attribute tasks (binary, multiclass): a linear probe on each feature set (:func:`fit_linear`, the
  L2 strength chosen on the validation users, its grid widened past an edge);
- next-item tasks: a kNN score on each feature set: the ``k`` training users most similar by cosine
  vote for their own next items, each with its similarity; ``k`` is chosen on the validation users.

Outputs follow the harness's format (scores ``[n, O]``; top-k item ids for next), so the caller
scores them with engine/downstream/evaluate.py's bootstrap like any other model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from engine.downstream.baselines import (
    _sparse,
    bag_layout,
    bag_of_attributes,
    fit_linear,
    primary_score,
    rms_scale,
    search_on_edges,
)
from engine.downstream.metrics import top_k
from engine.downstream.tasks import FIRST_ID, Split, TaskData
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

FEATURE_SETS = ("embedding", "counts", "counts+embedding")
KNN_GRID = (10, 30, 100)  # neighbours; widened upwards (x3) while the largest is best


def read_embeddings(path: str | Path, data: TokenizedData) -> np.ndarray:
    """float32 [num_users, H]: the embeddings of an `embed` Parquet file, in the dataset's row order.

    Every tokenized user must be in the file (matched by ``user_id``); a missing one is an error naming it.
    """
    table = pq.read_table(path, columns=["user_id", "embedding"])
    index = pc.index_in(data.user_ids, value_set=table.column("user_id"))  # null where a user is missing
    if index.null_count:
        first = int(np.flatnonzero(pc.is_null(index).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{path}: {index.null_count} of {data.num_users} tokenized users have no embedding "
                         f"(first: user_id {data.user_ids[first].as_py()!r}); export with `userbert-engine embed` "
                         "from the same tokenized directory")
    pos = index.to_numpy(zero_copy_only=False).astype(np.int64)
    emb = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(emb.type):
        raise ValueError(f"{path}: column embedding is {emb.type}, expected a fixed-size list (as `embed` writes)")
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(emb), emb.type.list_size)[pos]


@dataclass
class Standardiser:
    """Per-column mean and std over the training users (dense features)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 1e-8, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


class Features:
    """One feature set's rows for any dataset rows, fitted (scales) on the training users."""

    def __init__(self, name: str, data: TokenizedData, emb: np.ndarray | None, train_rows: np.ndarray):
        if name not in FEATURE_SETS:
            raise ValueError(f"feature set: expected one of {', '.join(FEATURE_SETS)}, got {name!r}")
        if "embedding" in name and emb is None:
            raise ValueError(f"feature set {name!r} needs embeddings")
        self.name, self.data, self.emb = name, data, emb
        self.std = Standardiser.fit(emb[train_rows]) if "embedding" in name else None
        if "counts" in name:
            self.layout = bag_layout(data)
            self.scale = rms_scale(bag_of_attributes(data, train_rows, self.layout), len(train_rows),
                                   self.layout.n_features)

    def coo(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(row, col, value, n_features) of ``rows``; counts are RMS-scaled, embeddings standardised."""
        parts, width = [], 0
        if "counts" in self.name:
            r, c, v = bag_of_attributes(self.data, rows, self.layout)
            parts.append((r, c, v * self.scale[c]))
            width = self.layout.n_features
        if "embedding" in self.name:
            e = self.std(self.emb[rows])  # [n, H]
            n, h = e.shape
            parts.append((np.repeat(np.arange(n), h), width + np.tile(np.arange(h), n), e.reshape(-1)))
            width += h
        r, c, v = (np.concatenate(x) for x in zip(*parts))
        return r, c, v.astype(np.float64), width

    def tensor(self, rows: np.ndarray) -> torch.Tensor:
        r, c, v, width = self.coo(rows)
        return _sparse((r, c, v), len(rows), width, np.ones(width))

    def unit_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Dense [n, F] rows of length 1 (cosine similarity is then a dot product).  counts+embedding: each
        part normalised on its own, so the similarity is the mean of the two cosines."""
        r, c, v, width = self.coo(rows)
        x = torch.zeros(len(rows), width, dtype=torch.float32)
        x[torch.from_numpy(r), torch.from_numpy(c)] = torch.from_numpy(v.astype(np.float32))
        if self.name == "counts+embedding":
            cut = self.layout.n_features
            return torch.cat([_unit(x[:, :cut]), _unit(x[:, cut:])], dim=1) / np.sqrt(2.0)
        return _unit(x)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_scores(train_x: torch.Tensor, train: TaskData, x: torch.Tensor, k: int, block: int = 1024) -> np.ndarray:
    """float64 [n, V]: each user's ``k`` most similar training users (rows of unit vectors) vote for their
    next items, each vote weighted by similarity and spread over the neighbour's items (1/|items|)."""
    offsets, ids = train.label_csr(np.arange(len(train)))
    lens = np.diff(offsets)
    votes = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([np.repeat(np.arange(len(train)), lens), ids.astype(np.int64)])),
        torch.from_numpy(np.repeat(1.0 / np.maximum(lens, 1), lens).astype(np.float32)),
        (len(train), train.n_outputs), check_invariants=False).coalesce()
    k = min(k, len(train))
    out = np.empty((len(x), train.n_outputs), np.float64)
    for i in range(0, len(x), block):
        sim = x[i:i + block] @ train_x.T  # [b, n_train]
        top = sim.topk(k, dim=1)
        w = torch.zeros_like(sim).scatter_(1, top.indices, top.values.clamp_min(0.0))  # [b, n_train]
        out[i:i + block] = torch.sparse.mm(votes.t(), w.T).T.double().numpy()
    out[:, :FIRST_ID] = -np.inf
    return out


def probe_outputs(data: TokenizedData, td: TaskData, split: Split, emb: np.ndarray | None,
                  feature_sets: tuple[str, ...] = FEATURE_SETS, k: int = 20) -> dict[str, np.ndarray]:
    """Per feature set, the test users' outputs (scores; top-k ids for next) and what validation chose.

    Returns {feature set: outputs}; the chosen L2 / k are logged.
    """
    train, val, test = td.subset(split.train), td.subset(split.val), td.subset(split.test)
    out: dict[str, np.ndarray] = {}
    for name in feature_sets:
        feats = Features(name, data, emb, train.rows)
        if td.task == "next":
            tx, vx, sx = feats.unit_rows(train.rows), feats.unit_rows(val.rows), feats.unit_rows(test.rows)
            if len(val):
                def score_of(n: float, tx=tx, vx=vx) -> float:
                    return primary_score(val, knn_scores(tx, train, vx, int(n)))

                best, tried = search_on_edges(score_of, KNN_GRID, factor=3.0, max_widen=2)
                best = int(best)
            else:
                best, tried = KNN_GRID[1], []
            log.info("knn probe %s: k %d (validation %s)", name, best,
                     ", ".join(f"{int(v)}: {s:.4f}" for v, s in tried))
            out[name] = top_k(knn_scores(tx, train, sx, best), k, np.arange(FIRST_ID), test.seen_csr())
        else:
            model = fit_linear(feats.tensor(train.rows), train, feats.tensor(val.rows) if len(val) else None,
                               val if len(val) else None)
            log.info("linear probe %s: L2 %g (validation %s)", name, model.l2,
                     ", ".join(f"{v:g}: {s:.4f}" for v, s in model.tried))
            out[name] = model.scores(feats.tensor(test.rows))
    return out
