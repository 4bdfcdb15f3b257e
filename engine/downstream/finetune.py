"""Fine-tuning on downstream user tasks: the first token's hidden state plus a task head.

Tasks (the ``--task`` flag; label tables and their checks are in engine/downstream/tasks.py):
- ``binary``: a 0/1 label (user targeting, a binary attribute).  BCE; ROC AUC and accuracy.
- ``multiclass``: an int or string label.  Softmax CE; one-vs-rest ROC AUC and accuracy.
- ``next``: a list of item values of ``finetune.next_attribute`` (e.g. the genres bought after the
  pretraining window).  Ranking over that attribute's vocabulary with the same multi-label softmax
  CE as pretraining; mAP@10, recall@10, NDCG@10.

Split: ``test_fraction`` of the labelled users (20%) are held out and only ever evaluated;
``val_fraction`` (10%) pick the epoch (early stopping); the rest train.  A split can also come
from the label table's ``split`` column or a split file.  Metrics on val and test every epoch.

Modes: end to end (default); ``freeze_encoder`` (feature-based: only the head trains);
``probe_epochs`` (linear probe, then fine-tune: the head first learns on frozen features, so the
encoder is not pushed around by a random head's gradients); ``layer_lr_decay`` (lower layers
learn slower).  What the head reads (:class:`TaskModel`): ``pooling`` (cls, mean, or a learned
attention pooling), ``pool_layers`` (the mean of the last k layers' states), and with ``wide`` a
linear map of the user's attribute counts added to the logits (binary and multiclass).

Training: the loop of pretraining (engine/train/loop.py) with a different step module
(:class:`FinetuneStep`), data (:class:`_Epochs`: epochs over the training users) and what happens
between steps (evaluation after each epoch, early stopping).  The same backends run it: plain
torch, or DeepSpeed with ``--deepspeed_config`` (docs/DOWNSTREAM.md).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from common.atomic import atomic_write, atomic_write_bytes
from common.progress import Bar
from common.typed_config import ConfigError, to_dict
from engine.config import FinetuneConfig, ModelConfig, TrainConfig, VocabSpec
from engine.data.batch import Batch
from engine.data.collate import CollateConfig, Collator
from engine.data.loader import eval_batches, to_device
from engine.downstream.baselines import popularity_scores
from engine.downstream.metrics import RANK_K, mask_items, score_metrics, task_metrics
from engine.downstream.tasks import (
    PRIMARY_METRIC,
    Split,
    Task,
    TaskData,
    make_split,
)
from engine.downstream.wide import WideCounts
from engine.model.export import load_model_description, load_weights, save_model
from engine.model.userbert import UserBERT, user_attr_offsets
from engine.train.backends import DeepSpeedBackend, TorchBackend
from engine.train.deepspeed_config import ResolvedDeepSpeed, resolve_ds_config
from engine.train.distributed import DistContext, resolve_device
from engine.train.loop import Backend, Loop, LoopState, MicroBatch, StepStats
from engine.train.optim import weight_decay_mask
from kernels.multi_label_ce import multi_label_softmax_ce
from tokenizer.schema import FIRST_ID
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")


# -- model ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A batch's labels on the model's device: ``y`` (binary/multiclass) or a CSR of relevant items (next)."""

    y: torch.Tensor | None = None
    label_offsets: torch.Tensor | None = None
    label_ids: torch.Tensor | None = None


def batch_target(td: TaskData, index: np.ndarray, device: torch.device) -> Target:
    if td.task == "next":
        lo, li = td.label_csr(index)
        return Target(label_offsets=torch.from_numpy(lo).to(device), label_ids=torch.from_numpy(li).to(device))
    return Target(y=torch.from_numpy(td.y[index]).to(device))


class AttentionPool(nn.Module):
    """Learned attention pooling ``[B, T, H]`` -> ``[B, H]``: softmax over the user's real tokens of ``q . h_t``,
    then the weighted sum of their states.

    ``q`` starts at zero, so the pooling starts as the mean over real tokens (pooling "mean") and learns which
    tokens to weigh from there.  No bias: a score offset common to every token cancels in the softmax.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden))

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """hidden ``[B, T, H]``; padding_mask bool ``[B, T]`` (True: real token; CLS is always one) -> ``[B, H]``."""
        scores = (hidden @ self.query.to(hidden.dtype)).float()  # [B, T]; softmax in fp32
        scores = scores.masked_fill(~padding_mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).to(hidden.dtype)  # [B, T], 0 on padding
        return torch.einsum("bt,bth->bh", weights, hidden)


class TaskModel(nn.Module):
    """UserBERT encoder + a linear head on the user embedding (the first token's hidden state by default).

    ``forward(batch)`` returns scores ``[B, n_outputs]``; ``forward(batch, target)`` the mean loss, so a
    wrapping engine (DeepSpeed) sees the whole computation inside ``forward``.

    Options (FinetuneConfig): ``pooling`` "cls", "mean" or "attention" (a learned :class:`AttentionPool`);
    ``pool_layers`` = k pools the mean of the last k layers' states (:meth:`UserBERT.encode`); ``wide``
    adds a linear map of the user's bag of attribute counts to the logits (engine/downstream/wide.py),
    binary and multiclass only.  The pooling and wide parameters are the task model's, beside the head.
    """

    def __init__(self, encoder: UserBERT, task: Task, n_outputs: int, pooling: str = "cls", pool_layers: int = 1,
                 wide: bool = False):
        super().__init__()
        if pooling not in ("cls", "mean", "attention"):
            raise ConfigError(f"finetune.pooling: expected cls, mean or attention, got {pooling!r}")
        n_layers = encoder.cfg.layers
        if not 1 <= pool_layers <= n_layers:
            raise ConfigError(f"finetune.pool_layers: must be in 1..{n_layers} (the encoder's layers), "
                              f"got {pool_layers}")
        if wide and task == "next":
            raise ConfigError("finetune.wide: only binary and multiclass tasks take a wide count input; next-item "
                              "scores go through the fused multi-label CE kernel over the user state only")
        self.encoder = encoder
        self.task = task
        self.pooling = pooling
        self.pool_layers = pool_layers
        hidden = encoder.cfg.hidden
        self.head = nn.Linear(hidden, n_outputs)
        nn.init.normal_(self.head.weight, std=encoder.cfg.init_std)
        nn.init.zeros_(self.head.bias)
        # Built after the head, so that the head's init (the random draws) is the same with or without them.
        self.pool = AttentionPool(hidden) if pooling == "attention" else None
        self.wide = WideCounts(encoder.spec, n_outputs, bias=False) if wide else None  # the head has the bias

    def head_modules(self) -> list[nn.Module]:
        """What learns at the head's rate: the head, and the attention pooling and wide weights when present."""
        return [m for m in (self.head, self.pool, self.wide) if m is not None]

    def embed(self, batch: Batch) -> torch.Tensor:
        if self.pool is None:
            return self.encoder.user_embedding(batch, self.pooling, self.pool_layers)  # [B, H]
        return self.pool(self.encoder.encode(batch, self.pool_layers), batch.padding_mask())  # [B, H]

    def scores(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits ``[B, n_outputs]`` of user embeddings ``h`` [B, H] (and, with ``wide``, of ``batch``'s counts)."""
        logits = self.head(h)
        return logits if self.wide is None else logits + self.wide(batch).to(logits.dtype)

    def forward(self, batch: Batch, target: Target | None = None) -> torch.Tensor:
        h = self.embed(batch)
        if target is None:
            return self.scores(h, batch)  # [B, n_outputs]
        return self.loss(h, target, None if self.task == "next" else self.scores(h, batch))  # a scalar

    def loss(self, h: torch.Tensor, target: Target, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of user embeddings ``h`` [B, H] against ``target``; binary and multiclass read ``logits``
        (:meth:`scores`) when given, which a model with ``wide`` needs (they depend on the batch, not only h)."""
        if self.task == "next":
            # The fused multi-label CE never materialises [B, V] logits in full (large vocabularies).
            per_row = multi_label_softmax_ce(h, self.head.weight, self.head.bias, target.label_offsets,
                                             target.label_ids, normalize=True, impl=self.encoder.cfg.kernel_impl)
            return per_row.mean()
        if logits is None:
            if self.wide is not None:
                raise ValueError("TaskModel.loss: a model with a wide input needs its logits (TaskModel.scores)")
            logits = self.head(h)
        logits = logits.float()
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], target.y.float())
        return F.cross_entropy(logits, target.y)


def build_encoder(init: str | Path | None, model_cfg: ModelConfig | None, spec: VocabSpec,
                  seed: int | None = None) -> UserBERT:
    """A pretrained encoder from a run dir, an exported model dir or a fine-tuned model dir; or a
    fresh one (``init`` None or "none", seeded with ``seed`` when given)."""
    if init is None or str(init) == "none":
        if model_cfg is None:
            raise ValueError("build_encoder: a model from scratch needs a model config")
        if seed is not None:
            torch.manual_seed(seed)
        return UserBERT(model_cfg, spec)
    model_dir = _model_dir(Path(init))
    saved_cfg, saved_spec, _ = load_model_description(model_dir)
    if saved_spec.to_dict() != spec.to_dict():
        raise ValueError(f"{model_dir}: the model was pretrained on data with other segments or vocabularies "
                         "than the tokenized data given; fine-tune on the same tokenized directory")
    encoder = UserBERT(saved_cfg, saved_spec)
    state = load_weights(model_dir)
    if any(k.startswith("encoder.") for k in state) and "head.weight" in state:
        # A fine-tuned TaskModel: its encoder's weights, without the task head.
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder.load_state_dict(state)
    return encoder


def _model_dir(path: Path) -> Path:
    return path / "model" if (path / "model" / "model.json").exists() else path


def load_task_model(ft_dir: str | Path, spec: VocabSpec) -> tuple[TaskModel, dict[str, Any]]:
    """A fine-tuned model (``userbert-engine finetune --out FTDIR``) with its head, and its model.json meta."""
    model_dir = _model_dir(Path(ft_dir))
    _, _, desc = load_model_description(model_dir)
    meta = desc.get("meta", {})
    if "task" not in meta or "n_outputs" not in meta:
        raise ValueError(f"{model_dir}: not a fine-tuned model (model.json has no task head); "
                         "pass the --out directory of `userbert-engine finetune`")
    encoder = build_encoder(model_dir, None, spec)
    model = TaskModel(encoder, meta["task"], int(meta["n_outputs"]), meta.get("pooling", "cls"),
                      int(meta.get("pool_layers", 1)), bool(meta.get("wide", False)))
    # The whole task model (strict): the head, and the attention pooling and wide weights when it has them.
    model.load_state_dict(load_weights(model_dir))
    return model, meta


# -- optimisation -----------------------------------------------------------------------------------------
def param_groups(model: TaskModel, ft: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the head (with the attention pooling and wide weights, as fresh as the head)
    at ``lr * head_lr_mult``; encoder layer i of L at ``lr * layer_lr_decay ** (L - 1 - i)`` (the embeddings
    one step below layer 0); weight decay by :func:`engine.train.optim.weight_decay_mask`, the rule
    pretraining uses.  The pretext heads are left out (unused)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    decays = weight_decay_mask(model)

    def add(p: nn.Parameter, name: str, lr: float) -> None:
        groups.setdefault((lr, not decays[id(p)]), []).append(p)

    for module in model.head_modules():
        for name, p in module.named_parameters():
            add(p, name, ft.lr * ft.head_lr_mult)
    if not ft.freeze_encoder:
        enc = model.encoder
        n_layers = len(enc.encoder.blocks)
        for name, p in enc.named_parameters():
            if name.startswith("heads."):
                continue
            if name.startswith("encoder.blocks."):
                depth = n_layers - 1 - int(name.split(".")[2])
            elif name.startswith("encoder."):  # the final LayerNorm sits above the top block
                depth = 0
            else:  # embeddings
                depth = n_layers
            add(p, name, ft.lr * ft.layer_lr_decay ** depth)
    return [{"params": ps, "lr": lr, "weight_decay": 0.0 if nd else ft.weight_decay}
            for (lr, nd), ps in groups.items()]


def finetune_deepspeed_config(raw: dict[str, Any], ft: FinetuneConfig, world_size: int, device_type: str,
                              where: str = "deepspeed config") -> ResolvedDeepSpeed:
    """A DeepSpeed JSON made ready for fine-tuning: the same rules as pretraining (engine/train/deepspeed_config.py),
    with the run's values taken from ``[finetune]``: the global batch is ``batch_size`` users per rank times
    the world size, one micro-batch per step (the loop steps every batch), and ``lr``, ``weight_decay``,
    ``grad_clip`` are finetune's.  The optimizer section is checked and dropped: our AdamW with its groups
    (head rate, layer decay) is handed to DeepSpeed.  A scheduler section is refused: fine-tuning runs at a
    constant rate."""
    if "scheduler" in raw:
        raise ConfigError(f"{where}: scheduler: fine-tuning runs at a constant learning rate (finetune.lr); remove "
                          "the scheduler section (the shipped configs/ds/zero*_bf16.json have none)")
    tc = TrainConfig(batch_size=ft.batch_size * world_size, micro_batch_size=ft.batch_size, lr=ft.lr,
                     weight_decay=ft.weight_decay, grad_clip=ft.grad_clip, steps=1)
    try:
        resolved = resolve_ds_config(raw, tc, world_size, device_type, where)
    except ConfigError as e:
        raise ConfigError(f"{e} (fine-tuning: train.batch_size means finetune.batch_size x world size "
                          f"= {tc.batch_size}, train.lr finetune.lr = {ft.lr}, train.grad_clip finetune.grad_clip)"
                          ) from None
    if resolved.layout.accumulation != 1:
        raise ConfigError(f"{where}: gradient_accumulation_steps = {resolved.layout.accumulation}: fine-tuning "
                          "steps once per micro-batch; use \"auto\" or 1")
    return resolved


def _set_encoder_trainable(model: TaskModel, trainable: bool) -> None:
    for name, p in model.encoder.named_parameters():
        if not name.startswith("heads."):
            p.requires_grad_(trainable)


# -- prediction and metrics -------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: TaskModel, collator: Collator, rows: np.ndarray, batch_size: int, device: torch.device,
            k: int = RANK_K, td: TaskData | None = None, exclude: tuple[np.ndarray, np.ndarray] | None = None
            ) -> tuple[np.ndarray, float]:
    """Model outputs for dataset ``rows``, in order, and the mean loss when ``td`` (same users) is given.

    Outputs: scores ``[n, n_outputs]`` for binary/multiclass; for next, the top-``k`` item ids
    ``[n, k]`` (reserved ids never ranked, nor each user's ``exclude`` items: a CSR aligned with
    ``rows``, by default ``td``'s seen items), reduced batch by batch so a large vocabulary never
    needs an [n, V] matrix.
    """
    if exclude is None and td is not None:
        exclude = td.seen_csr()
    model.eval()
    outs, total = [], 0.0
    start = 0
    for b in eval_batches(collator, rows, batch_size):
        b = to_device(b, device)
        h = model.embed(b)
        logits = model.scores(h, b)
        if td is not None:
            idx = np.arange(start, start + b.batch_size)
            total += float(model.loss(h, batch_target(td, idx, device), logits)) * len(idx)
        scores = logits.float()
        start += b.batch_size
        if model.task == "next":
            scores[:, :FIRST_ID] = -math.inf
            mask_items(scores, exclude, start - b.batch_size)
            kk = min(k, scores.shape[1])
            vals, ids = torch.topk(scores, kk, dim=1)
            # torch.topk orders ties arbitrarily; re-sort by (score desc, id asc) for determinism.
            ids = ids.cpu().numpy()
            vals = vals.cpu().numpy()
            order = np.lexsort((ids, -vals), axis=1)
            outs.append(np.take_along_axis(ids, order, axis=1).astype(np.int64))
        else:
            outs.append(scores.cpu().numpy())
    width = min(k, model.head.out_features) if model.task == "next" else model.head.out_features
    out = np.concatenate(outs) if outs else np.zeros((0, width), np.float32)
    return out, (total / len(rows) if td is not None and len(rows) else float("nan"))


# -- the loop ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    task: Task
    init: str
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, val_loss, val.<metric>, test.<metric>
    val: dict[str, float]  # metrics of the chosen epoch on the validation users
    test: dict[str, float]  # ... and on the held-out test users ({} without a test split)
    best_epoch: int
    seconds: float
    sizes: dict[str, int]
    popular: dict[str, float]  # the most-popular baseline on the test users (val without a test split)
    model: TaskModel | None = field(default=None, repr=False)
    split: Split | None = field(default=None, repr=False)

    @property
    def best(self) -> dict[str, float]:
        """The reported metrics: test when there is a test split, else validation."""
        return self.test if self.test else self.val

    @property
    def n_train(self) -> int:
        return self.sizes["train"]

    @property
    def n_val(self) -> int:
        return self.sizes["val"]

    @property
    def n_test(self) -> int:
        return self.sizes["test"]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "init": self.init, "pooling": self.model.pooling if self.model else None,
                "best_epoch": self.best_epoch, "val": self.val,
                "test": self.test, "popular": self.popular, "sizes": self.sizes, "seconds": self.seconds,
                "history": self.history}


class FinetuneStep(nn.Module):
    """What the backend wraps: ``forward(batch, target) -> (loss, stats)``, as pretraining's step module."""

    def __init__(self, model: TaskModel):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, target: Target) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model(batch, target), {}


# (step module, optimizer) -> the backend that runs the steps (default: TorchBackend, or DeepSpeed).
BackendFactory = Callable[[nn.Module, torch.optim.Optimizer], Backend]


def finetune(data: TokenizedData, td: TaskData, ft: FinetuneConfig, encoder: UserBERT, *,
             split: Split | None = None, out_dir: str | Path | None = None, device: str = "auto",
             progress: bool = True, init_name: str = "", pretrained: bool = False, rank: int = 0,
             world_size: int = 1, deepspeed: ResolvedDeepSpeed | None = None,
             backend: BackendFactory | None = None) -> FinetuneResult:
    """Fine-tune ``encoder`` + a fresh head on ``td``: train on the train users, pick the epoch with the
    best validation metric (early stopping), report validation and test metrics every epoch.

    ``split`` defaults to :func:`engine.downstream.tasks.make_split` with the config's fractions and seed.
    The steps run in the training loop (engine/train/loop.py) on plain torch, on DeepSpeed with a resolved
    ``deepspeed`` config (:func:`finetune_deepspeed_config`; the process group must exist), or on what
    ``backend(step_module, optimizer)`` returns.  ``rank``/``world_size`` give every rank a disjoint slice
    of each global batch; evaluation runs on every rank over all users, so every rank sees the same
    metrics and takes the same early-stopping decision.
    """
    dev = resolve_device(device)
    split_seed = ft.seed if ft.split_seed is None else ft.split_seed
    if split is None:
        split = make_split(td, ft.val_fraction, ft.test_fraction, split_seed)
    train_idx = split.train[:ft.max_train_users] if ft.max_train_users else split.train
    train, val, test = td.subset(train_idx), td.subset(split.val), td.subset(split.test)
    torch.manual_seed(ft.seed)
    collator = Collator(data, user_attr_offsets(encoder.spec), CollateConfig(select_prob=0.0))
    pooling = resolve_pooling(ft.pooling, pretrained)
    model = TaskModel(encoder, td.task, td.n_outputs, pooling, ft.pool_layers, ft.wide).to(dev)
    if td.task == "next" and ft.init_head_from_pretext and pretrained:
        _init_head_from_pretext(model, ft.next_attribute, td.n_outputs)
    if ft.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = ft.dropout
    _set_encoder_trainable(model, not ft.freeze_encoder)
    groups = param_groups(model, ft)
    optimizer = torch.optim.AdamW(groups)
    ctx = DistContext(rank, world_size, 0, dev, "", owns_group=False)
    step_module = FinetuneStep(model)
    if backend is not None:
        be = backend(step_module, optimizer)
    elif deepspeed is not None:
        # Our AdamW with its per-group rates (head, layer-wise decay): DeepSpeed's own optimizer section would
        # flatten them to one rate (finetune_deepspeed_config checked and removed it).
        be = DeepSpeedBackend(step_module, optimizer, ctx, deepspeed.config, precision=deepspeed.precision,
                              min_loss_scale=deepspeed.min_loss_scale, weights=model)
    else:
        be = TorchBackend(step_module, optimizer, ctx, grad_clip=ft.grad_clip,
                          clip_params=[p for g in groups for p in g["params"]], weights=model)

    ref = test if len(test) else val
    popular = score_metrics(ref, popularity_scores(train, len(ref))) if len(ref) else {}
    epochs = _Epochs(model, ft, td, train, val, test, collator, dev, rank, world_size)
    start = time.perf_counter()
    bar = Bar(f"finetune {td.task}{' ' + init_name if init_name else ''}", ft.epochs, progress and rank == 0,
              unit="epoch", scale=False, leave=False)
    try:
        loop = Loop(be, ctx, lr_key="finetune.lr")
        loop.run(epochs.batches(), LoopState(), ft.epochs * epochs.per_epoch, lambda s: epochs.after_step(s, bar))
    finally:
        bar.close()
        if backend is None and deepspeed is not None:
            be.close()
    if epochs.best_state is not None:
        model.load_state_dict(epochs.best_state)
    chosen = epochs.history[epochs.best_epoch] if epochs.best_epoch >= 0 else {}
    result = FinetuneResult(
        td.task, init_name, epochs.history,
        val={k[4:]: v for k, v in chosen.items() if k.startswith("val.")},
        test={k[5:]: v for k, v in chosen.items() if k.startswith("test.")},
        best_epoch=epochs.best_epoch, seconds=time.perf_counter() - start,
        sizes={"train": len(train), "val": len(val), "test": len(test)}, popular=popular, model=model, split=split)
    if out_dir is not None and rank == 0:
        save_finetuned(out_dir, result, model, data, td, ft)
    return result


class _Epochs:
    """The fine-tuning phase to the loop: its data, epoch by epoch (a shuffled pass over the training
    users, this rank's slice of each global batch), and after each epoch's last step the evaluation on
    val and test, the best epoch so far and early stopping."""

    def __init__(self, model: TaskModel, ft: FinetuneConfig, td: TaskData, train: TaskData, val: TaskData,
                 test: TaskData, collator: Collator, dev: torch.device, rank: int, world_size: int):
        self.model, self.ft, self.train, self.val, self.test = model, ft, train, val, test
        self.collator, self.dev, self.rank, self.world_size = collator, dev, rank, world_size
        self.metric = PRIMARY_METRIC[td.task]
        self.global_bs = ft.batch_size * world_size
        # A last batch too small to give every rank a user: all ranks skip it (the same decision everywhere),
        # since one rank skipping a step that the others take would hang their all-reduce.
        self.per_epoch = sum(1 for i in range(0, len(train), self.global_bs)
                             if min(self.global_bs, len(train) - i) >= world_size)
        if ft.epochs and not self.per_epoch:
            raise ValueError(f"finetune: {len(train)} training users cannot give each of {world_size} ranks one")
        self.rng = np.random.default_rng([ft.seed, 7])
        self.eval_bs = max(ft.batch_size, 256)
        self.history: list[dict[str, float]] = []
        self.best_key, self.best_epoch, self.best_state, self.bad = -math.inf, -1, None, 0
        self.probing = False
        self.total, self.n = 0.0, 0

    def batches(self) -> Iterator[MicroBatch]:
        ft, model = self.ft, self.model
        for epoch in range(ft.epochs):
            self.probing = epoch < ft.probe_epochs and not ft.freeze_encoder
            if ft.probe_epochs and not ft.freeze_encoder and epoch in (0, ft.probe_epochs):
                _set_encoder_trainable(model, not self.probing)
                self.bad = 0  # the fine-tuning phase gets its own patience
            model.train()
            if ft.freeze_encoder or self.probing:
                model.encoder.eval()  # no dropout in a frozen feature extractor
            order = self.rng.permutation(len(self.train))
            for i in range(0, len(order), self.global_bs):
                if len(order[i:i + self.global_bs]) < self.world_size:
                    break
                idx = order[i:i + self.global_bs][self.rank::self.world_size]  # this rank's slice
                batch = to_device(self.collator(self.train.rows[idx]), self.dev)
                yield MicroBatch((batch, batch_target(self.train, idx, self.dev)), len(idx))

    def after_step(self, s: StepStats, bar: Bar) -> str | None:
        self.total += s.loss * s.users
        self.n += s.users
        if (s.step + 1) % self.per_epoch:
            return None
        epoch = s.step // self.per_epoch
        row: dict[str, float] = {"epoch": epoch, "train_loss": self.total / max(self.n, 1)}
        self.total, self.n = 0.0, 0
        for name, part in (("val", self.val), ("test", self.test)):
            if len(part):
                out, loss = predict(self.model, self.collator, part.rows, self.eval_bs, self.dev, td=part)
                row[f"{name}_loss"] = loss
                row.update({f"{name}.{k}": v for k, v in task_metrics(part, out).items()})
        self.history.append(row)
        if len(self.val):
            key = row[f"val.{self.metric}"] if self.ft.early_stop_on == "metric" else -row["val_loss"]
        else:
            key = float(epoch)  # nothing to choose on: keep the last epoch
        bar.update(1)
        bar.postfix({k: f"{row[k]:.4f}" for k in (f"val.{self.metric}", f"test.{self.metric}") if k in row})
        if key > self.best_key:
            self.best_key, self.best_epoch, self.bad = key, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.ft.patience and not self.probing:
                return "early stop"
        return None


def resolve_pooling(pooling: str, pretrained: bool) -> str:
    """``auto`` -> mean for a pretrained encoder (its word states are trained, its first token's are not),
    cls from scratch (see FinetuneConfig.pooling)."""
    if pooling == "auto":
        return "mean" if pretrained else "cls"
    return pooling


def _init_head_from_pretext(model: TaskModel, next_attribute: str, n_outputs: int) -> None:
    # Next-item tasks rank over an attribute's vocabulary whose pretext head already scores it.
    seg, _, attr = next_attribute.partition(".")
    pretext = model.encoder.pretrain_head(seg, attr)
    if pretext.weight.shape != model.head.weight.shape:
        raise ValueError(f"finetune.next_attribute {next_attribute}: pretext head has "
                         f"{pretext.weight.shape[0]} outputs, the task has {n_outputs}")
    with torch.no_grad():
        model.head.weight.copy_(pretext.weight)
        model.head.bias.copy_(pretext.bias)


def save_finetuned(out_dir: str | Path, result: FinetuneResult, model: TaskModel, data: TokenizedData,
                   td: TaskData, ft: FinetuneConfig) -> None:
    """FTDIR: result.json (metrics per epoch), split.parquet (user_id, split), model/ (safetensors + json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**result.to_dict(), "finetune": to_dict(ft), "labels": td.source}
    atomic_write_bytes(out_dir / "result.json", json.dumps(doc, indent=2, default=str))
    split = result.split
    train = split.train[:ft.max_train_users] if ft.max_train_users else split.train
    idx = np.concatenate([train, split.val, split.test])  # users left out by max_train_users are not listed
    names = ["train"] * len(train) + ["val"] * len(split.val) + ["test"] * len(split.test)
    table = pa.table({"user_id": data.user_ids.take(pa.array(td.rows[idx])), "split": pa.array(names, pa.string())})
    atomic_write(out_dir / "split.parquet", lambda f: pq.write_table(table, f))
    meta = {"task": td.task, "n_outputs": td.n_outputs, "pooling": model.pooling, "pool_layers": model.pool_layers,
            "wide": model.wide is not None, "next_attribute": ft.next_attribute,
            "classes": [str(c) for c in td.classes], "labels": td.source, "init": result.init}
    save_model(out_dir / "model", model, model.encoder.cfg, model.encoder.spec, meta=meta)
