"""`userbert-engine embed`: one row per user (user_id, embedding) to Parquet, in batches."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common.atomic import atomic_write
from common.progress import Bar
from engine.config import VocabSpec
from engine.data.collate import CollateConfig, Collator
from engine.data.loader import eval_batches, sequence_lengths, to_device
from engine.downstream.finetune import build_encoder, load_task_model
from engine.model.userbert import user_attr_offsets
from engine.train.distributed import resolve_device
from tokenizer.shards import open_tokenized

log = logging.getLogger("userbert")


@torch.no_grad()
def export_embeddings(data_dir: str | Path, checkpoint: str | Path, out_path: str | Path, *,
                      batch_size: int = 512, device: str = "auto", progress: bool = True,
                      rows_per_group: int = 65536, pooling: str | None = None) -> int:
    """Embed every tokenized user with the checkpoint's encoder; returns the number of users written.

    ``checkpoint``: a pretraining run dir, an exported model dir or a fine-tuned model dir (its encoder).
    ``pooling``: None takes a fine-tuned model's own pooling, and "mean" for a pretrained model: the
    pretext task trains the word positions' final states, never the first token's, so the mean of
    a user's states is the representation pretraining actually shaped.  A fine-tuned model's own
    pooling exports what its head read (its attention pooling and ``pool_layers`` included);
    "attention" has learned weights only in a model fine-tuned with it.
    Users are embedded ``batch_size`` at a time and written in row groups of ``rows_per_group``, so
    memory stays bounded by one row group's embeddings whatever the number of users.
    """
    own = finetuned_pooling(checkpoint)
    if pooling is None:
        pooling = own or "mean"
    if pooling not in ("cls", "mean", "attention"):
        raise ValueError(f"pooling: expected 'cls', 'mean' or 'attention', got {pooling!r}")
    if pooling == "attention" and own != "attention":
        raise ValueError(f"{checkpoint}: pooling 'attention' has weights only in a model fine-tuned with "
                         "finetune.pooling = \"attention\" (pretraining learns none); pass such a model's "
                         "fine-tuning dir, or pooling 'cls' or 'mean'")
    data = open_tokenized(data_dir)
    spec = VocabSpec.from_manifest(data.manifest)
    dev = resolve_device(device)
    if pooling == own:  # the fine-tuned model's own representation: its pooling weights and pool_layers
        task_model = load_task_model(checkpoint, spec)[0].to(dev).eval()
        encoder, embed = task_model.encoder, task_model.embed
    else:
        encoder = build_encoder(checkpoint, None, spec).to(dev).eval()
        embed = partial(encoder.user_embedding, pooling=pooling)
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    hidden = encoder.cfg.hidden
    schema = pa.schema([("user_id", data.user_ids.type), ("embedding", pa.list_(pa.float32(), hidden))])
    n = data.num_users

    def write(f) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            bar = Bar("embed", n, progress, unit="user", scale=False)
            for start in range(0, n, rows_per_group):
                rows = np.arange(start, min(n, start + rows_per_group))
                # Embed in order of sequence length: a batch's grid is padded to its longest user, and
                # histories are heavy-tailed (random batches of the demo data are ~68% padding).
                order = np.argsort(sequence_lengths(collator, rows), kind="stable")
                parts = [embed(to_device(b, dev)).float().cpu().numpy()
                         for b in _tracked(eval_batches(collator, rows[order], batch_size), bar)]
                emb = np.empty((len(rows), hidden), np.float32)
                emb[order] = np.concatenate(parts)  # back to row order: [rows, H]
                values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), hidden)
                writer.write_table(pa.table({"user_id": data.user_ids.slice(start, len(rows)), "embedding": values},
                                            schema=schema))
            bar.close()

    atomic_write(Path(out_path), write)
    log.info("wrote %d user embeddings of width %d to %s", n, hidden, out_path)
    return n


def default_pooling(checkpoint: str | Path) -> str:
    """The pooling a fine-tuned model was trained with, else "mean" (see :func:`export_embeddings`)."""
    return finetuned_pooling(checkpoint) or "mean"


def finetuned_pooling(checkpoint: str | Path) -> str | None:
    """The pooling of a fine-tuned model dir; None for anything else (a pretrained model has none of its own)."""
    from engine.downstream.finetune import _model_dir
    from engine.model.export import load_model_description

    try:
        meta = load_model_description(_model_dir(Path(checkpoint)))[2].get("meta", {})
    except (FileNotFoundError, ValueError):
        return None
    return meta.get("pooling") if "task" in meta else None


def _tracked(batches, bar):
    for b in batches:
        yield b
        bar.update(b.batch_size)
