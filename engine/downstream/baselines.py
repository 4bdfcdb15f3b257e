"""Baselines that fine-tuned UserBERT models are compared against, on the same split.

- **popular**: every user gets the training labels' frequencies (next: the most-popular items;
  binary: the prior, so AUC 0.5 by construction; multiclass: the class frequencies).
- **history** (next-item tasks only): popularity plus the user's own past items of the ranked
  attribute, ``share(item) + w * own_count(item)``, with w chosen on the validation users (from 0,
  popularity alone, to "own items first").  Repeat purchases matter in grocery data, so this is
  the bar a recommender has to clear there.
- **logreg**: logistic regression on bag-of-attribute counts, the thing a user would try first.
  Features: per behaviour attribute value, log(1 + the number of the user's actions with that
  value), one-hot user attributes, and log(1 + words) per segment; each column scaled by its RMS
  over the training users.  Binary: logistic loss; multiclass: softmax; next: the same multi-label
  softmax cross entropy as the model, over the item vocabulary.  L2 strength picked on the
  validation users from 1e-4..1e-1, the grid widened 10x past an edge while the best value lies
  there (a grid whose best is its largest value has not found the optimum).  Fitted full-batch
  with L-BFGS in torch (sparse features).  The same fit (:func:`fit_linear`) is the linear probe
  of exported embeddings (engine/downstream/probe.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.downstream.metrics import score_metrics
from engine.downstream.tasks import FIRST_ID, PRIMARY_METRIC, TaskData, _ranges, action_values
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

Scorer = Callable[[np.ndarray], np.ndarray]  # dataset rows -> scores [n, n_outputs]


# -- popular / history ------------------------------------------------------------------------------------
def popularity_vector(train: TaskData) -> np.ndarray:
    """float64 [n_outputs]: the scores every user gets from the most-popular baseline."""
    if train.task == "next":
        counts = np.bincount(train.label_ids, minlength=train.n_outputs).astype(np.float64)
        counts[:FIRST_ID] = -np.inf  # padding / unknown are never recommended
        return counts
    if train.task == "binary":
        p = train.y.mean() if len(train.y) else 0.5
        return np.array([np.log(max(p, 1e-9) / max(1 - p, 1e-9))])  # the prior's logit
    return np.bincount(train.y, minlength=train.n_outputs).astype(np.float64)


def popularity_scores(train: TaskData, n: int) -> np.ndarray:
    """The most-popular baseline's scores for n users."""
    v = popularity_vector(train)
    return np.broadcast_to(v, (n, len(v))).copy()


def item_counts(data: TokenizedData, rows: np.ndarray, attribute: str, n_items: int) -> np.ndarray:
    """float64 [len(rows), n_items]: how many of each user's actions have each value of ``attribute``
    (``segment.name``)."""
    who, ids = action_values(data, rows, attribute)
    out = np.zeros((len(rows), n_items), np.float64)
    np.add.at(out, (who, np.minimum(ids, n_items - 1)), 1.0)
    return out


HISTORY_WEIGHTS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0, 1e6)


def history_scorer(data: TokenizedData, train: TaskData, attribute: str, val: TaskData | None = None,
                   weights: tuple[float, ...] = HISTORY_WEIGHTS) -> Scorer:
    """Popularity plus the user's own past items: ``share(item) + w * own_count(item)``.

    ``share`` is the item's share of the training labels.  ``w`` is chosen on the validation users
    (mAP@10) from ``weights``: 0 is the most-popular baseline, a huge w ranks the user's own items by
    count with popularity only breaking ties and filling the list.  Without validation users,
    w = 1e6 (own history first).
    """
    pop = popularity_vector(train)
    finite = np.isfinite(pop)
    share = np.where(finite, pop / max(pop[finite].sum(), 1.0), -np.inf)

    def make(w: float) -> Scorer:
        return lambda rows: share[None, :] + w * item_counts(data, rows, attribute, train.n_outputs)

    if val is None or not len(val):
        return make(weights[-1])
    scored = [(primary_score(val, make(w)(val.rows)), w) for w in weights]
    best = max(scored, key=lambda t: (t[0], -t[1]))[1]  # ties: the smaller weight
    log.info("history baseline: weight %g (validation mAP@10 %s)", best,
             ", ".join(f"{w:g}: {v:.4f}" for v, w in scored))
    return make(best)


# -- bag-of-attribute features --------------------------------------------------------------------------
@dataclass
class BagFeatures:
    """Column layout of the bag-of-attribute features of a tokenized dataset."""

    names: list[str]  # one per block: "long.genre", "user.age", "long.#words", ...
    starts: list[int]  # first column of each block
    n_features: int


def bag_layout(data: TokenizedData) -> BagFeatures:
    names, starts, col = [], [], 0
    manifest = data.manifest
    for seg in data.segments:
        sizes = manifest["segments"][seg.name]["vocab_sizes"]
        for a, v in zip(seg.attributes, sizes):
            names.append(f"{seg.name}.{a}")
            starts.append(col)
            col += int(v)
        names.append(f"{seg.name}.#words")
        starts.append(col)
        col += 1
    ua = manifest.get("user_attributes", {"names": [], "vocab_sizes": []})
    for a, v in zip(ua["names"], ua["vocab_sizes"]):
        names.append(f"user.{a}")
        starts.append(col)
        col += int(v)
    return BagFeatures(names, starts, col)


def bag_of_attributes(data: TokenizedData, rows: np.ndarray, layout: BagFeatures | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO (row, col, value) of the log-count features of dataset ``rows`` (rows are 0..len-1)."""
    layout = layout or bag_layout(data)
    start = dict(zip(layout.names, layout.starts))
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    r_parts, c_parts = [], []
    dense_r, dense_c, dense_v = [], [], []
    for seg in data.segments:
        lens = seg.user_action_offsets[rows + 1] - seg.user_action_offsets[rows]
        acts = seg.attr_ids[_ranges(seg.user_action_offsets[rows], lens)]  # [n_actions, K]
        who = np.repeat(np.arange(n, dtype=np.int64), lens)
        for k, a in enumerate(seg.attributes):
            ids = acts[:, k].astype(np.int64)
            real = ids > 0  # padding ids carry nothing
            r_parts.append(who[real])
            c_parts.append(start[f"{seg.name}.{a}"] + ids[real])
        words = seg.user_word_offsets[rows + 1] - seg.user_word_offsets[rows]
        dense_r.append(np.arange(n, dtype=np.int64))
        dense_c.append(np.full(n, start[f"{seg.name}.#words"], np.int64))
        dense_v.append(np.log1p(words.astype(np.float64)))
    r = np.concatenate(r_parts) if r_parts else np.zeros(0, np.int64)
    c = np.concatenate(c_parts) if c_parts else np.zeros(0, np.int64)
    keys, counts = np.unique(r * layout.n_features + c, return_counts=True)
    rr, cc, vv = keys // layout.n_features, keys % layout.n_features, np.log1p(counts.astype(np.float64))
    ua_names = data.manifest.get("user_attributes", {"names": []})["names"]
    for j, a in enumerate(ua_names):
        dense_r.append(np.arange(n, dtype=np.int64))
        dense_c.append(start[f"user.{a}"] + data.user_attr_ids[rows, j].astype(np.int64))
        dense_v.append(np.ones(n))
    return (np.concatenate([rr, *dense_r]), np.concatenate([cc, *dense_c]), np.concatenate([vv, *dense_v]))


def _sparse(coo: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, n_features: int,
            scale: np.ndarray) -> torch.Tensor:
    r, c, v = coo
    idx = torch.from_numpy(np.stack([r, c]))
    val = torch.from_numpy((v * scale[c]).astype(np.float32))
    return torch.sparse_coo_tensor(idx, val, (n, n_features), check_invariants=False).coalesce()


# -- logistic regression ----------------------------------------------------------------------------------
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # the starting grid; widened while its best value lies on an edge
MAX_WIDEN = 4  # at most this many extra values per fit (10x beyond the edge each)


@dataclass
class LinearModel:
    """A fitted linear model on any feature matrix (sparse or dense rows x features)."""

    task: str
    weight: torch.Tensor  # [F, O]
    bias: torch.Tensor  # [O]
    l2: float
    tried: list[tuple[float, float]]  # (l2, validation score) of every value tried, in order

    def scores(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            out = (_mm(x, self.weight) + self.bias).double().numpy()
        if self.task == "next":
            out[:, :FIRST_ID] = -np.inf
        return out


@dataclass
class LogReg:
    """Logistic regression on bag-of-attribute features (a :class:`LinearModel` and its features)."""

    linear: LinearModel
    scale: np.ndarray  # [F] column scaling learned on the training users
    layout: BagFeatures

    @property
    def l2(self) -> float:
        return self.linear.l2

    def features(self, data: TokenizedData, rows: np.ndarray) -> torch.Tensor:
        return _sparse(bag_of_attributes(data, rows, self.layout), len(rows), self.layout.n_features, self.scale)

    def scores(self, data: TokenizedData, rows: np.ndarray) -> np.ndarray:
        return self.linear.scores(self.features(data, rows))


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(x, w) if x.is_sparse else x @ w


def initial_bias(train: TaskData) -> np.ndarray:
    """The label prior as the bias the fit starts from (log frequencies; -inf for never-seen items)."""
    pop = popularity_vector(train)
    if train.task == "next":
        finite = np.isfinite(pop)
        init = np.full(len(pop), -np.inf)
        init[finite] = np.log((pop[finite] + 1.0) / (pop[finite] + 1.0).sum())
        return init
    if train.task == "multiclass":
        return np.log((pop + 1.0) / (pop + 1.0).sum())
    return pop


def _fit_linear(x: torch.Tensor, td: TaskData, l2: float, init_bias: np.ndarray, max_iter: int = 200
                ) -> tuple[torch.Tensor, torch.Tensor]:
    n, n_feat = x.shape
    n_out = td.n_outputs
    w = torch.zeros(n_feat, n_out, requires_grad=True)
    b = torch.tensor(np.where(np.isfinite(init_bias), init_bias, -30.0), dtype=torch.float32, requires_grad=True)
    if td.task == "next":
        offsets, ids = td.label_csr(np.arange(n))
        lens = np.diff(offsets)
        tgt_row = torch.from_numpy(np.repeat(np.arange(n), lens))
        tgt_id = torch.from_numpy(ids.astype(np.int64))
        tgt_w = torch.from_numpy(np.repeat(1.0 / np.maximum(lens, 1), lens).astype(np.float32))
        mask = torch.zeros(n_out, dtype=torch.bool)
        mask[:FIRST_ID] = True
    else:
        y = torch.from_numpy(td.y)

    def loss_fn() -> torch.Tensor:
        logits = _mm(x, w) + b
        if td.task == "binary":
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        elif td.task == "multiclass":
            loss = F.cross_entropy(logits, y)
        else:
            logp = torch.log_softmax(logits.masked_fill(mask, -1e4), dim=1)
            loss = -(logp[tgt_row, tgt_id] * tgt_w).sum() / n
        return loss + 0.5 * l2 * (w * w).sum()

    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with _threads(1 if w.numel() < 1_000_000 else torch.get_num_threads()):
        opt.step(closure)
    return w.detach(), b.detach()


@contextmanager
def _threads(n: int) -> Iterator[None]:
    # L-BFGS on a small model is latency-bound (thousands of tiny dot products): OpenMP threads only add
    # synchronisation, which made a 10k-parameter fit ~50x slower on a busy 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def primary_score(td: TaskData, scores: np.ndarray) -> float:
    """The task's primary metric for a score matrix (used to pick hyperparameters on validation users)."""
    return score_metrics(td, scores)[PRIMARY_METRIC[td.task]]


def search_on_edges(score_of: Callable[[float], float], grid: tuple[float, ...], *, factor: float = 10.0,
                    max_widen: int = MAX_WIDEN) -> tuple[float, list[tuple[float, float]]]:
    """The grid value with the best score, widening the grid while the best lies on its edge.

    A best value at the smallest (largest) value tried, strictly better than its neighbour, means the
    optimum may lie beyond it: the next value ``factor`` further out is tried, up to ``max_widen``
    times.  Ties go to the value tried first.  Returns (best value, [(value, score)] of all tried).
    """
    tried = {v: score_of(v) for v in sorted(grid)}
    for _ in range(max_widen if len(tried) > 1 else 0):
        values = sorted(tried)
        scores = [tried[v] if np.isfinite(tried[v]) else -np.inf for v in values]
        best = int(np.argmax(scores))
        if best == 0 and scores[0] > scores[1]:
            nxt = values[0] / factor
        elif best == len(values) - 1 and scores[-1] > scores[-2]:
            nxt = values[-1] * factor
        else:
            break
        tried[nxt] = score_of(nxt)
    values = sorted(tried)
    best_value = max(values, key=lambda v: tried[v] if np.isfinite(tried[v]) else -np.inf)
    return best_value, [(v, tried[v]) for v in values]


def fit_linear(x_train: torch.Tensor, train: TaskData, x_val: torch.Tensor | None = None, val: TaskData | None = None,
               l2_grid: tuple[float, ...] = L2_GRID, max_widen: int = MAX_WIDEN) -> LinearModel:
    """A linear model (logistic / softmax / multi-label softmax by task) on any features, with the L2 strength
    that scores best on the validation users: searched over ``l2_grid``, widened where the best lies on an
    edge (:func:`search_on_edges`).  Without validation users, the middle of the grid.  Features should be
    on one scale (e.g. each column scaled by its RMS or standardised), so one strength suits all columns.
    """
    init = initial_bias(train)
    if val is None or not len(val) or x_val is None:
        l2 = l2_grid[len(l2_grid) // 2]
        w, b = _fit_linear(x_train, train, l2, init)
        return LinearModel(train.task, w, b, l2, [(l2, float("nan"))])
    fits: dict[float, LinearModel] = {}

    def score_of(l2: float) -> float:
        w, b = _fit_linear(x_train, train, l2, init)
        fits[l2] = LinearModel(train.task, w, b, l2, [])
        return primary_score(val, fits[l2].scores(x_val))

    best, tried = search_on_edges(score_of, l2_grid, max_widen=max_widen)
    model = fits[best]
    model.tried = tried
    scores = dict(tried)
    for edge, inner in ((0, 1), (-1, -2)):
        if len(tried) > 1 and tried[edge][0] == best and scores[best] > tried[inner][1]:
            log.info("linear model: the best L2 (%g) is still on the edge of the widened grid %s", best,
                     [v for v, _ in tried])
    return model


def rms_scale(coo: tuple[np.ndarray, np.ndarray, np.ndarray], n_rows: int, n_features: int) -> np.ndarray:
    """1 / RMS of every column over ``n_rows`` rows (0 for empty columns): puts counts and one-hots on one scale
    without centring, so sparse features stay sparse."""
    _, c, v = coo
    sq = np.bincount(c, weights=v * v, minlength=n_features) / max(n_rows, 1)
    return np.where(sq > 0, 1.0 / np.sqrt(np.maximum(sq, 1e-12)), 0.0)


def fit_logreg(data: TokenizedData, train: TaskData, val: TaskData | None,
               l2_grid: tuple[float, ...] = L2_GRID, max_widen: int = MAX_WIDEN) -> LogReg:
    """Logistic regression on bag-of-attribute counts; the L2 strength with the best validation metric
    (the grid widened past an edge, :func:`fit_linear`)."""
    layout = bag_layout(data)
    coo = bag_of_attributes(data, train.rows, layout)
    scale = rms_scale(coo, len(train), layout.n_features)
    x = _sparse(coo, len(train), layout.n_features, scale)
    x_val = (_sparse(bag_of_attributes(data, val.rows, layout), len(val), layout.n_features, scale)
             if val is not None and len(val) else None)
    return LogReg(fit_linear(x, train, x_val, val, l2_grid, max_widen), scale, layout)
