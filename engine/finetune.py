"""Fine-tuning on downstream user tasks: the first token's hidden state plus a task head.

Tasks (the ``--task`` flag):
- ``binary``: a 0/1 label (user targeting, a binary attribute).  BCE; ROC AUC and accuracy.
- ``multiclass``: an int or string label.  Softmax CE; one-vs-rest ROC AUC and accuracy.
- ``next``: a list of item values of ``finetune.next_attribute`` (e.g. the genres bought after the
  pretraining window).  Ranking over that attribute's vocabulary with the same multi-label softmax
  CE as pretraining; mAP@10.

Labels are a table of ``user_id`` plus ``label`` (Parquet, CSV or Arrow IPC).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from engine.checkpoint import load_model_description, load_weights, save_model
from engine.collate import CollateConfig, Collator
from engine.config import FinetuneConfig, ModelConfig, VocabSpec
from engine.data import eval_batches, to_device
from engine.metrics import accuracy, map_at_k, roc_auc, roc_auc_ovr
from engine.model import UserBERT, user_attr_offsets
from engine.pretrain import resolve_device
from kernels.multi_label_ce import multi_label_softmax_ce
from tokenizer.io import read_table
from tokenizer.schema import FIRST_ID
from tokenizer.shards import TokenizedData

log = logging.getLogger("userbert")

Task = Literal["binary", "multiclass", "next"]
PRIMARY_METRIC = {"binary": "auc", "multiclass": "auc", "next": "map@10"}


@dataclass
class TaskData:
    """Labelled users of one task, aligned with dataset rows."""

    task: Task
    rows: np.ndarray  # int64 [n] dataset row of each labelled user
    y: np.ndarray | None = None  # int64 [n] (binary, multiclass)
    label_offsets: np.ndarray | None = None  # int64 [n + 1] (next): CSR of relevant item ids
    label_ids: np.ndarray | None = None  # int32 [nnz]
    n_outputs: int = 1
    classes: list[Any] = field(default_factory=list)  # multiclass: label value of each class index
    unknown_users: int = 0  # labelled users not in the tokenized data (reported, not used)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: np.ndarray) -> TaskData:
        out = copy.copy(self)
        out.rows = self.rows[idx]
        if self.y is not None:
            out.y = self.y[idx]
        if self.label_offsets is not None:
            lens = np.diff(self.label_offsets)[idx]
            out.label_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            out.label_ids = np.concatenate(
                [self.label_ids[self.label_offsets[i]:self.label_offsets[i + 1]] for i in idx]
            ).astype(np.int32) if len(idx) else np.zeros(0, np.int32)
        return out


def load_task(labels_path: str | Path, data: TokenizedData, task: Task, next_attribute: str = "long.genre") -> TaskData:
    """Read a label table and align it with the tokenized users."""
    table = read_table(labels_path, columns=["user_id", "label"])
    rows = data.user_index(table.column("user_id"))
    known = rows >= 0
    unknown = int((~known).sum())
    if unknown:
        log.warning("%s: %d of %d labelled users are not in the tokenized data; they are left out",
                    labels_path, unknown, len(rows))
    labels = table.column("label").filter(pa.array(known))
    rows = rows[known].astype(np.int64)
    if task == "binary":
        y = np.asarray(labels.to_numpy(zero_copy_only=False), dtype=np.int64)
        if not np.isin(y, [0, 1]).all():
            raise ValueError(f"{labels_path}: column 'label': binary task expects 0/1 labels, "
                             f"found {sorted(set(y.tolist()) - {0, 1})[:5]}")
        return TaskData(task, rows, y=y, n_outputs=1, unknown_users=unknown)
    if task == "multiclass":
        classes = sorted(set(labels.to_pylist()), key=str)
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[v] for v in labels.to_pylist()], dtype=np.int64)
        return TaskData(task, rows, y=y, n_outputs=len(classes), classes=classes, unknown_users=unknown)
    if task == "next":
        seg, _, attr = next_attribute.partition(".")
        vocab = data.vocab(seg, attr)
        if not pa.types.is_list(labels.type) and not pa.types.is_large_list(labels.type):
            raise ValueError(f"{labels_path}: column 'label': task 'next' expects a list of {next_attribute} "
                             f"values per user, got {labels.type}")
        flat = pc.list_flatten(labels)
        ids = pc.index_in(flat.cast(vocab.type), value_set=vocab).to_numpy(zero_copy_only=False)
        ids = np.where(np.isnan(ids.astype(np.float64)), -1, ids).astype(np.int64)
        lens = pc.list_value_length(labels).fill_null(0).to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        # Unknown items cannot be ranked; drop them from the relevant sets, and count them.
        keep = ids >= 0
        if (~keep).any():
            log.warning("%s: %d label items are not in the %s vocabulary", labels_path, int((~keep).sum()),
                        next_attribute)
        kept = np.concatenate([[0], np.cumsum(keep)])
        new_lens = kept[offsets[1:]] - kept[offsets[:-1]]  # known items per user
        label_ids = (ids[keep] + FIRST_ID).astype(np.int32)
        label_offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
        has = new_lens > 0
        out = TaskData(task, rows, label_offsets=label_offsets, label_ids=label_ids,
                       n_outputs=len(vocab) + FIRST_ID, unknown_users=unknown)
        return out.subset(np.flatnonzero(has))
    raise ValueError(f"unknown task {task!r} (expected binary, multiclass or next)")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed split by user into train and validation indices."""
    perm = np.random.default_rng([seed, 20220222]).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TaskModel(nn.Module):
    """UserBERT encoder + a linear head on the first token's hidden state."""

    def __init__(self, encoder: UserBERT, n_outputs: int, pooling: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.cfg.hidden
        self.head = nn.Linear(hidden, n_outputs)
        nn.init.normal_(self.head.weight, std=encoder.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def embed(self, batch) -> torch.Tensor:
        return self.encoder.user_embedding(batch, self.pooling)  # [B, H]

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.embed(batch))  # [B, n_outputs]


def task_loss(model: TaskModel, batch, td: TaskData, index: np.ndarray, impl: str) -> torch.Tensor:
    """Mean loss over the batch; ``index`` are the batch users' positions in ``td``."""
    if td.task == "next":
        h = model.embed(batch)  # [B, H]
        lo, li = _csr_rows(td.label_offsets, td.label_ids, index)
        per_row = multi_label_softmax_ce(h, model.head.weight, model.head.bias, torch.from_numpy(lo).to(h.device),
                                         torch.from_numpy(li).to(h.device), normalize=True, impl=impl)
        return per_row.mean()
    logits = model(batch)
    y = torch.from_numpy(td.y[index]).to(logits.device)
    if td.task == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(1).float(), y.float())
    return F.cross_entropy(logits.float(), y)


def _csr_rows(offsets: np.ndarray, ids: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lens = (offsets[index + 1] - offsets[index]).astype(np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    picked = np.concatenate([ids[offsets[i]:offsets[i + 1]] for i in index]) if len(index) else ids[:0]
    return new_offsets, picked.astype(np.int32)


@torch.no_grad()
def predict(model: TaskModel, collator: Collator, rows: np.ndarray, batch_size: int,
            device: torch.device) -> np.ndarray:
    """Scores [n, n_outputs] (logits) for dataset rows, in order."""
    model.eval()
    out = [model(to_device(b, device)).float().cpu().numpy() for b in eval_batches(collator, rows, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)


def evaluate_scores(td: TaskData, scores: np.ndarray) -> dict[str, float]:
    if td.task == "binary":
        s = scores[:, 0]
        return {"auc": roc_auc(td.y, s), "accuracy": accuracy(td.y, (s > 0).astype(np.int64))}
    if td.task == "multiclass":
        return {"auc": roc_auc_ovr(td.y, scores), "accuracy": accuracy(td.y, scores.argmax(1))}
    return {"map@10": map_at_k(scores, td.label_offsets, td.label_ids, k=10, exclude=np.arange(FIRST_ID))}


def popularity_scores(train: TaskData, n: int) -> np.ndarray:
    """The most-popular baseline: every user gets the training labels' frequencies as scores."""
    if train.task == "next":
        counts = np.bincount(train.label_ids, minlength=train.n_outputs).astype(np.float64)
    elif train.task == "binary":
        counts = np.array([train.y.mean() if len(train.y) else 0.5])
        counts = np.log(counts / np.clip(1 - counts, 1e-9, None))  # the prior's logit
    else:
        counts = np.bincount(train.y, minlength=train.n_outputs).astype(np.float64)
    return np.broadcast_to(counts, (n, len(counts))).copy()


@dataclass
class FinetuneResult:
    task: Task
    init: str
    history: list[dict[str, float]]
    best: dict[str, float]
    best_epoch: int
    seconds: float
    n_train: int
    n_val: int
    popular: dict[str, float]


def build_encoder(init: str | Path | None, model_cfg: ModelConfig, spec: VocabSpec) -> UserBERT:
    """A pretrained encoder from an exported model dir (or its run dir), or a fresh one."""
    if init is None or str(init) == "none":
        return UserBERT(model_cfg, spec)
    init = Path(init)
    model_dir = init / "model" if (init / "model" / "model.json").exists() else init
    saved_cfg, saved_spec, _ = load_model_description(model_dir)
    if saved_spec.to_dict() != spec.to_dict():
        raise ValueError(f"{model_dir}: the model was pretrained on data with other segments or vocabularies "
                         "than the tokenized data given; fine-tune on the same tokenized directory")
    encoder = UserBERT(saved_cfg, saved_spec)
    encoder.load_state_dict(load_weights(model_dir))
    return encoder


def finetune(data: TokenizedData, td: TaskData, ft: FinetuneConfig, encoder: UserBERT, *,
             out_dir: str | Path | None = None, device: str = "auto", progress: bool = True,
             init_name: str = "", pretrained: bool = False) -> FinetuneResult:
    """Fine-tune ``encoder`` + a fresh head on ``td`` with early stopping on the validation metric."""
    torch.manual_seed(ft.seed)
    dev = resolve_device(device)
    train_idx, val_idx = split_indices(len(td), ft.val_fraction, ft.seed)
    if ft.max_train_users:
        train_idx = train_idx[:ft.max_train_users]
    train, val = td.subset(train_idx), td.subset(val_idx)
    spec = encoder.spec
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    model = TaskModel(encoder, td.n_outputs, ft.pooling).to(dev)
    if td.task == "next" and ft.init_head_from_pretext and pretrained:
        seg, _, attr = ft.next_attribute.partition(".")
        pretext = encoder.pretrain_head(seg, attr)
        if pretext.weight.shape != model.head.weight.shape:
            raise ValueError(f"finetune.next_attribute {ft.next_attribute}: pretext head has "
                             f"{pretext.weight.shape[0]} outputs, the task has {td.n_outputs}")
        with torch.no_grad():
            model.head.weight.copy_(pretext.weight)
            model.head.bias.copy_(pretext.bias)
    if ft.dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = ft.dropout
    if ft.freeze_encoder:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    groups = [{"params": list(model.head.parameters()), "lr": ft.lr * ft.head_lr_mult}]
    if not ft.freeze_encoder:
        groups.append({"params": list(model.encoder.parameters()), "lr": ft.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=ft.weight_decay)
    metric = PRIMARY_METRIC[td.task]
    popular = evaluate_scores(val, popularity_scores(train, len(val)))

    history: list[dict[str, float]] = []
    best, best_epoch, best_state, bad = {metric: -math.inf}, -1, None, 0
    start = time.perf_counter()
    rng = np.random.default_rng(ft.seed)
    impl = encoder.cfg.kernel_impl
    bar = tqdm(range(ft.epochs), desc=f"finetune {td.task}{' ' + init_name if init_name else ''}",
               disable=not progress, dynamic_ncols=True, leave=False)
    for epoch in bar:
        model.train()
        if ft.freeze_encoder:
            model.encoder.eval()  # no dropout in a frozen feature extractor
        order = rng.permutation(len(train))
        total, n = 0.0, 0
        for i in range(0, len(order), ft.batch_size):
            idx = order[i:i + ft.batch_size]
            batch = to_device(collator(train.rows[idx]), dev)
            loss = task_loss(model, batch, train, idx, impl)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(idx)
            n += len(idx)
        scores = predict(model, collator, val.rows, max(ft.batch_size, 256), dev)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), **evaluate_scores(val, scores)}
        history.append(row)
        bar.set_postfix({metric: f"{row[metric]:.4f}"})
        if row[metric] > best[metric]:
            best, best_epoch, bad = row, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= ft.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result = FinetuneResult(td.task, init_name, history, best, best_epoch, time.perf_counter() - start,
                            len(train), len(val), popular)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
        save_model(out_dir / "model", model, encoder.cfg, spec, meta={"task": td.task, "n_outputs": td.n_outputs})
    return result
