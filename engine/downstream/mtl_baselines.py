"""The paper's multi-task baselines: Wide&Deep + MTL, LSTM + MTL and Transformer + MTL.

UserBERT is compared against models that never see a pretext task: they learn from the downstream
labels only, all tasks at once, through one shared trunk with a head per task::

    batch ──trunk──> h [B, H] ──heads[task]──> binary: 1 logit | multiclass: C logits | next: V item scores

Trunks (``ARCHS``), all fed by the same Batch that UserBERT reads (engine/data/batch.py):

- ``wide_deep``: wide = a linear map of the user's bag of attribute counts (log(1 + count) of every
  attribute value over the user's actions, per segment, plus the one-hot user attributes);
  deep = an MLP over the mean-pooled attribute embeddings (per segment and attribute, the mean of
  the embeddings of the values of the user's actions) and the user-attribute embeddings.
  ``h = wide(x) + deep(x)``: the heads are linear, so a task's logit is the sum of a wide and a deep
  logit, Wide&Deep's joint model, with the wide weights of all tasks sharing a rank-H factorisation.
- ``lstm``: an LSTM over UserBERT's own token vectors (engine/model/embeddings.py: CLS, user
  attributes, then every behaviour word as gather-concat-mean of its actions' attribute embeddings +
  position + segment), ``h`` its last hidden state.  The same input layer as UserBERT, so the
  comparison is about the sequence model, not the features.
- ``transformer``: the UserBERT encoder itself (engine/model), from scratch, ``h`` the first
  token's final state (pooling "cls", the paper's, and the better one from scratch: docs/DOWNSTREAM.md).

What the paper states: the three baselines, that they are trained on the downstream tasks only and
jointly (multi-task), and UserBERT's input layer and encoder.  What it leaves open, and what we chose:

- the multi-task loss is the plain sum of the tasks' mean losses, each over the users of the batch
  that have a label for that task (unweighted: no task weighting is described; the weights are an
  argument); a user without a label for a task adds nothing to that task's loss or gradient;
- the losses are those of single-task fine-tuning (engine/downstream/finetune.py): BCE, softmax CE,
  and for next-item tasks the multi-label softmax CE over the attribute's vocabulary;
- sizes: every trunk is H = model.hidden wide; the LSTM has one layer (``MTLConfig.lstm_layers``), is
  unidirectional and reads the tokens in the grid's order (CLS, user attributes, long-term words,
  short-term words, each segment oldest first), so its last state has seen the most recent behaviour
  last; the deep tower has two ReLU layers; the wide part sees no cross features (the raw data has
  no hand-made crosses to give it, and the deep part models interactions);
- optimisation: AdamW with the weight-decay rule of engine/train/optim.py, one constant learning
  rate, gradient clipping, the epoch chosen on validation users by the mean over tasks of each
  task's primary metric (AUC, mAP@10; tasks whose metric is undefined on the validation users are
  left out of the mean), early stopping with ``patience``;
- users: one split by user for all tasks (a user's labels of every task are either all for
  training, all for validation or all for evaluation), so no task's training labels belong to a
  user another task is evaluated on.

Training runs on the loop of pretraining and fine-tuning (engine/train/loop.py): a step module
``(batch, targets) -> (loss, per-task losses)``, the torch backend, evaluation after each epoch's last
step, exactly as :mod:`engine.downstream.finetune` does it.  Predictions go through
:func:`engine.downstream.finetune.predict`, so they have its format: scores ``[n, n_outputs]``
(binary, multiclass), the top-k item ids ``[n, k]`` (next).  One process only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.progress import Bar
from engine.config import ModelConfig, VocabSpec
from engine.data.batch import Batch
from engine.data.collate import CollateConfig, Collator
from engine.data.loader import to_device
from engine.downstream.finetune import Target, batch_target, predict
from engine.downstream.metrics import RANK_K, task_metrics
from engine.downstream.tasks import PRIMARY_METRIC, TaskData
from engine.downstream.wide import WideCounts, action_users
from engine.model.userbert import UserBERT, user_attr_offsets
from engine.train.backends import TorchBackend
from engine.train.distributed import DistContext, resolve_device
from engine.train.loop import Loop, LoopState, MicroBatch, StepStats
from engine.train.optim import build_optimizer
from kernels.multi_label_ce import multi_label_softmax_ce
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

ARCHS = ("wide_deep", "lstm", "transformer")


@dataclass
class MTLConfig:
    """How a multi-task baseline trains (the trunk's width and the Transformer's shape: ModelConfig)."""

    batch_size: int = 128
    epochs: int = 10
    lr: float = 1e-3  # from scratch, no pretrained weights to protect: one rate for trunk and heads
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    patience: int = 3  # epochs without a better validation score before stopping
    seed: int = 0
    lstm_layers: int = 1
    deep_user_dim: int = 16  # Wide&Deep: width of each user-attribute embedding in the deep tower
    task_weights: dict[str, float] = field(default_factory=dict)  # task name -> loss weight (default 1)


# -- the trunks: forward(batch) -> h [B, H] -----------------------------------------------------------------
class WideDeep(nn.Module):
    """Wide: linear in log(1 + count) of every attribute value; deep: MLP over mean-pooled embeddings."""

    def __init__(self, cfg: ModelConfig, spec: VocabSpec, deep_user_dim: int = 16):
        super().__init__()
        H = cfg.hidden
        # Wide: the bag of counts and its linear map (engine/downstream/wide.py), H wide like the deep part.
        self.wide = WideCounts(spec, H)
        # Deep: an embedding table per (segment, attribute), as wide as UserBERT's; row 0 is padding.
        self.attr = nn.ModuleList([nn.ModuleList([nn.Embedding(v, d, padding_idx=0)
                                                  for v, d in zip(seg.vocab_sizes, seg.dims)])
                                   for seg in spec.segments])
        n_user = len(spec.user_vocab_sizes)
        self.user = nn.Embedding(sum(spec.user_vocab_sizes), deep_user_dim) if n_user else None
        d_in = sum(sum(seg.dims) for seg in spec.segments) + n_user * deep_user_dim
        self.deep = nn.Sequential(nn.Linear(d_in, H), nn.ReLU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(H, H), nn.ReLU())
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.init_std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        nn.init.zeros_(self.wide.table.weight)  # a linear model starts at zero (the loop above re-drew it)

    @property
    def n_wide(self) -> int:
        return self.wide.n_wide

    def wide_input(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bag of counts as COO (:meth:`engine.downstream.wide.WideCounts.wide_input`)."""
        return self.wide.wide_input(batch)

    def forward(self, batch: Batch) -> torch.Tensor:
        B = batch.batch_size
        wide = self.wide(batch)  # [B, H]: sum over the user's columns of log(1 + count) * W[column], + bias
        parts = []
        for s, sb in enumerate(batch.segments):
            who = action_users(batch, s)  # [A]
            for k, emb in enumerate(self.attr[s]):
                ids = sb.attr_ids[:, k].long()  # [A]
                real = (ids > 0).float()
                # Mean over the user's actions with a value; a user without any gets zeros.
                total = emb.weight.new_zeros(B, emb.embedding_dim).index_add(0, who, emb(ids))  # [B, d]
                count = real.new_zeros(B).index_add(0, who, real).clamp(min=1.0)  # [B]
                parts.append(total / count[:, None])
        if self.user is not None:
            parts.append(self.user(batch.user_attr_ids.long()).flatten(1))  # [B, U * d_user]
        deep = self.deep(torch.cat(parts, dim=1))  # [B, H]
        return wide + deep


class LSTMTrunk(nn.Module):
    """An LSTM over UserBERT's token vectors; h = the last layer's final hidden state."""

    def __init__(self, cfg: ModelConfig, spec: VocabSpec, layers: int = 1):
        super().__init__()
        # UserBERT's input layer with UserBERT's init (built inside a throwaway UserBERT: one init rule).
        self.embeddings = UserBERT(cfg, spec).embeddings
        self.lstm = nn.LSTM(cfg.hidden, cfg.hidden, num_layers=layers, batch_first=True,
                            dropout=cfg.dropout if layers > 1 else 0.0)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = self.embeddings(batch)  # [B, T, H]; every user has CLS, so every length is >= 1
        packed = nn.utils.rnn.pack_padded_sequence(x, batch.seq_lens.long().cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n [layers, B, H], in the batch's order
        return h_n[-1]


class TransformerTrunk(nn.Module):
    """The UserBERT encoder from scratch; h = the first token's final state."""

    def __init__(self, cfg: ModelConfig, spec: VocabSpec):
        super().__init__()
        self.bert = UserBERT(cfg, spec)
        del self.bert.heads  # the pretext heads: never trained here, so not parameters of this model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.bert.encode(batch)[:, 0]  # [B, H]


def build_trunk(arch: str, cfg: ModelConfig, spec: VocabSpec, mtl: MTLConfig | None = None) -> nn.Module:
    mtl = mtl or MTLConfig()
    if arch == "wide_deep":
        return WideDeep(cfg, spec, mtl.deep_user_dim)
    if arch == "lstm":
        return LSTMTrunk(cfg, spec, mtl.lstm_layers)
    if arch == "transformer":
        return TransformerTrunk(cfg, spec)
    raise ValueError(f"unknown multi-task baseline {arch!r} (known: {', '.join(ARCHS)})")


# -- the multi-task model and its loss ----------------------------------------------------------------------
@dataclass
class TaskSpec:
    """What a head needs of a task: its kind and its number of outputs (TaskData.task, .n_outputs)."""

    task: str  # binary | multiclass | next
    n_outputs: int


@dataclass
class TaskTargets:
    """One task's labels for one batch: which rows have one, and their labels (in that order)."""

    have: torch.Tensor  # int64 [n_labelled] batch rows with a label
    target: Target


class MTLModel(nn.Module):
    """A shared trunk and one linear head per task; ``forward(batch) -> h [B, H]``."""

    def __init__(self, trunk: nn.Module, tasks: dict[str, TaskSpec], hidden: int, init_std: float = 0.02,
                 kernel_impl: str = "auto"):
        super().__init__()
        self.trunk = trunk
        self.tasks = dict(tasks)
        self.kernel_impl = kernel_impl
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, t.n_outputs) for name, t in tasks.items()})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=init_std)
            nn.init.zeros_(head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.trunk(batch)  # [B, H]

    def task_loss(self, name: str, h: torch.Tensor, target: Target) -> torch.Tensor:
        """Mean loss of task ``name`` over user states ``h`` [n, H] (the losses of single-task fine-tuning)."""
        head, kind = self.heads[name], self.tasks[name].task
        if kind == "next":
            # The fused multi-label CE never materialises [n, V] logits in full (large vocabularies).
            return multi_label_softmax_ce(h, head.weight, head.bias, target.label_offsets, target.label_ids,
                                          normalize=True, impl=self.kernel_impl).mean()
        logits = head(h).float()
        if kind == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], target.y.float())
        return F.cross_entropy(logits, target.y)

    def loss(self, h: torch.Tensor, targets: dict[str, TaskTargets], weights: dict[str, float] | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over tasks of each task's mean loss over the rows that have its label; (loss, per-task losses).

        A task without a labelled row in the batch adds nothing (and reports 0)."""
        weights = weights or {}
        total = h.new_zeros((), dtype=torch.float32)
        stats: dict[str, float] = {}
        for name, t in targets.items():
            if t.have.numel() == 0:
                stats[f"loss/{name}"] = 0.0
                continue
            task_loss = self.task_loss(name, h[t.have], t.target)
            total = total + weights.get(name, 1.0) * task_loss
            stats[f"loss/{name}"] = float(task_loss.detach())
        return total, stats


class LabelIndex:
    """Dataset row -> position in each task's TaskData (-1: no label for that task)."""

    def __init__(self, tasks: dict[str, TaskData], num_users: int):
        self.tasks = tasks
        self.pos = {}
        for name, td in tasks.items():
            p = np.full(num_users, -1, np.int64)
            p[td.rows] = np.arange(len(td))
            self.pos[name] = p

    def targets(self, rows: np.ndarray, device: torch.device) -> dict[str, TaskTargets]:
        out = {}
        for name, td in self.tasks.items():
            pos = self.pos[name][rows]  # [B]
            have = np.flatnonzero(pos >= 0)
            out[name] = TaskTargets(torch.from_numpy(have).to(device), batch_target(td, pos[have], device))
        return out

    def restrict(self, rows: np.ndarray) -> dict[str, TaskData]:
        """Each task's labelled users among ``rows`` (in the order of ``rows``)."""
        out = {}
        for name, td in self.tasks.items():
            pos = self.pos[name][np.asarray(rows, np.int64)]
            out[name] = td.subset(pos[pos >= 0])
        return out


class MTLStep(nn.Module):
    """What the backend runs: ``forward(batch, targets) -> (loss, per-task losses)``, as FinetuneStep."""

    def __init__(self, model: MTLModel, weights: dict[str, float]):
        super().__init__()
        self.model, self.weights = model, weights

    def forward(self, batch: Batch, targets: dict[str, TaskTargets]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.loss(self.model(batch), targets, self.weights)


class _TaskView(nn.Module):
    """One task of an MTLModel as :func:`engine.downstream.finetune.predict` expects a task model
    (``embed``, ``head``, ``scores``, ``task``, ``loss``): predictions then have exactly the evaluation's format."""

    def __init__(self, model: MTLModel, name: str):
        super().__init__()
        self.model, self.name = model, name
        self.head = model.heads[name]
        self.task = model.tasks[name].task

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model(batch)

    def scores(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.head(h)

    def loss(self, h: torch.Tensor, target: Target, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.task_loss(self.name, h, target)


def predict_task(model: MTLModel, name: str, collator: Collator, rows: np.ndarray, batch_size: int,
                 device: torch.device, k: int = RANK_K, td: TaskData | None = None,
                 exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Task ``name``'s outputs for dataset ``rows`` in finetune.predict's format (and the mean loss given ``td``;
    ``exclude``: items never ranked per user, by default ``td``'s seen items)."""
    return predict(_TaskView(model, name), collator, np.asarray(rows, np.int64), batch_size, device, k=k, td=td,
                   exclude=exclude)


# -- training -----------------------------------------------------------------------------------------------
@dataclass
class MTLResult:
    arch: str
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, train.loss/<task>, val.<task>.<metric>, val_score
    best_epoch: int
    val: dict[str, dict[str, float]]  # task -> metrics of the chosen epoch on the validation users
    outputs: dict[str, np.ndarray]  # task -> predictions for predict_rows[task], in finetune.predict's format
    seconds: float
    sizes: dict[str, int]
    model: MTLModel | None = field(default=None, repr=False)


def train_mtl(data: TokenizedData, tasks: dict[str, TaskData], arch: str, model_cfg: ModelConfig,
              train_rows: np.ndarray, val_rows: np.ndarray, predict_rows: dict[str, np.ndarray] | None = None, *,
              cfg: MTLConfig | None = None, device: str = "cpu", k: int = RANK_K, progress: bool = False,
              predict_exclude: dict[str, tuple[np.ndarray, np.ndarray] | None] | None = None) -> MTLResult:
    """Train one multi-task baseline on all ``tasks`` jointly and predict with the chosen epoch's weights.

    tasks: name -> TaskData (engine/downstream/tasks.py load_task), labels of any subset of users.
    train_rows / val_rows: dataset rows (not TaskData positions) of the training and validation users; a
    user's labels of every task go where the user goes.  Users of train_rows without any label are skipped.
    predict_rows: name -> dataset rows to predict task ``name`` for (e.g. ``td.rows[split.test]``).
    predict_exclude: name -> CSR aligned with predict_rows[name] of items never ranked (TaskData.seen_csr()).
    Returns per-task outputs in finetune.predict's format, aligned with predict_rows[name].
    """
    cfg = cfg or MTLConfig()
    dev = resolve_device(device)
    spec = VocabSpec.from_manifest(data.manifest)
    torch.manual_seed(cfg.seed)
    index = LabelIndex(tasks, data.num_users)
    train_rows = np.asarray(train_rows, np.int64)
    labelled = np.zeros(len(train_rows), bool)
    for p in index.pos.values():
        labelled |= p[train_rows] >= 0
    train_rows = train_rows[labelled]
    if not len(train_rows):
        raise ValueError("train_mtl: no training user has a label of any task")
    val = index.restrict(val_rows)
    heads = {name: TaskSpec(td.task, td.n_outputs) for name, td in tasks.items()}
    model = MTLModel(build_trunk(arch, model_cfg, spec, cfg), heads, model_cfg.hidden, model_cfg.init_std,
                     model_cfg.kernel_impl).to(dev)
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))  # no masking
    optimizer = build_optimizer(model, cfg.lr, (0.9, 0.999), cfg.weight_decay)
    ctx = DistContext(0, 1, 0, dev, "", owns_group=False)
    backend = TorchBackend(MTLStep(model, cfg.task_weights), optimizer, ctx, grad_clip=cfg.grad_clip, weights=model)
    epochs = _Epochs(model, cfg, index, train_rows, val, collator, dev, k)
    bar = Bar(f"mtl {arch}", cfg.epochs, progress, unit="epoch", scale=False, leave=False)
    start = time.perf_counter()
    try:
        # The loop of both phases fits as it is: the step module's stats are the per-task losses (its "heads").
        loop = Loop(backend, ctx, heads=[f"loss/{n}" for n in tasks], lr_key="lr")
        loop.run(epochs.batches(), LoopState(), cfg.epochs * epochs.per_epoch, lambda s: epochs.after_step(s, bar))
    finally:
        bar.close()
    if epochs.best_state is not None:
        model.load_state_dict(epochs.best_state)
    chosen = epochs.history[epochs.best_epoch] if epochs.best_epoch >= 0 else {}
    outputs = {name: predict_task(model, name, collator, rows, epochs.eval_bs, dev, k=k,
                                  exclude=(predict_exclude or {}).get(name))[0]
               for name, rows in (predict_rows or {}).items()}
    val_metrics = {name: {m[len(name) + 5:]: v for m, v in chosen.items() if m.startswith(f"val.{name}.")}
                   for name in tasks}
    return MTLResult(arch, epochs.history, epochs.best_epoch, val_metrics, outputs, time.perf_counter() - start,
                     {"train": len(train_rows), **{f"val.{n}": len(v) for n, v in val.items()}}, model)


class _Epochs:
    """The phase to the loop: shuffled epochs over the training users, and after each epoch the validation
    score (mean of the tasks' primary metrics), the best epoch's weights and early stopping."""

    def __init__(self, model: MTLModel, cfg: MTLConfig, index: LabelIndex, train_rows: np.ndarray,
                 val: dict[str, TaskData], collator: Collator, dev: torch.device, k: int):
        self.model, self.cfg, self.index, self.train_rows = model, cfg, index, train_rows
        self.val, self.collator, self.dev, self.k = val, collator, dev, k
        self.per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
        self.rng = np.random.default_rng([cfg.seed, 16])
        self.eval_bs = max(cfg.batch_size, 256)
        self.history: list[dict[str, float]] = []
        self.best_key, self.best_epoch, self.best_state, self.bad = -math.inf, -1, None, 0
        self.sums: dict[str, float] = {}
        self.n = 0

    def batches(self) -> Iterator[MicroBatch]:
        for _ in range(self.cfg.epochs):
            self.model.train()
            order = self.rng.permutation(len(self.train_rows))
            for i in range(0, len(order), self.cfg.batch_size):
                rows = self.train_rows[order[i:i + self.cfg.batch_size]]
                batch = to_device(self.collator(rows), self.dev)
                yield MicroBatch((batch, self.index.targets(rows, self.dev)), len(rows))

    def after_step(self, s: StepStats, bar: Bar) -> str | None:
        for key, v in (("train_loss", s.loss), *((f"train.{h}", v) for h, v in s.heads.items())):
            self.sums[key] = self.sums.get(key, 0.0) + v * s.users
        self.n += s.users
        if (s.step + 1) % self.per_epoch:
            return None
        row: dict[str, float] = {"epoch": s.step // self.per_epoch,
                                 **{key: v / max(self.n, 1) for key, v in self.sums.items()}}
        self.sums, self.n = {}, 0
        primaries = []
        for name, td in self.val.items():
            if not len(td):
                continue
            out, loss = predict_task(self.model, name, self.collator, td.rows, self.eval_bs, self.dev, self.k, td)
            row[f"val.{name}.loss"] = loss
            metrics = task_metrics(td, out)
            row.update({f"val.{name}.{m}": v for m, v in metrics.items()})
            primaries.append(metrics[PRIMARY_METRIC[td.task]])
        finite = [p for p in primaries if math.isfinite(p)]
        # Nothing to choose on (no validation labels): keep the last epoch.
        row["val_score"] = float(np.mean(finite)) if finite else float("nan")
        key = row["val_score"] if finite else float(row["epoch"])
        self.history.append(row)
        bar.update(1)
        bar.postfix({"val_score": f"{row['val_score']:.4f}"})
        if key > self.best_key:
            self.best_key, self.best_epoch, self.bad = key, int(row["epoch"]), 0
            self.best_state = {n: v.detach().clone() for n, v in self.model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.cfg.patience:
                return "early stop"
        return None


def union_rows(tasks: dict[str, TaskData]) -> np.ndarray:
    """The sorted dataset rows labelled by any of ``tasks`` (what a split by user for all tasks splits)."""
    return np.unique(np.concatenate([td.rows for td in tasks.values()]))


__all__ = ["ARCHS", "MTLConfig", "MTLModel", "MTLResult", "WideDeep", "LSTMTrunk", "TransformerTrunk", "TaskSpec",
           "TaskTargets", "LabelIndex", "build_trunk", "predict_task", "train_mtl", "union_rows", "action_users"]
