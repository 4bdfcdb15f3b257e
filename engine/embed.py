"""`userbert-engine embed`: one row per user (user_id, embedding) to Parquet, in batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from engine.checkpoint import atomic_write
from engine.collate import CollateConfig, Collator
from engine.config import VocabSpec
from engine.data import eval_batches, to_device
from engine.finetune import build_encoder
from engine.model import user_attr_offsets
from engine.pretrain import resolve_device
from tokenizer.shards import open_tokenized

log = logging.getLogger("userbert")


@torch.no_grad()
def export_embeddings(data_dir: str | Path, checkpoint: str | Path, out_path: str | Path, *,
                      batch_size: int = 512, device: str = "auto", progress: bool = True,
                      rows_per_group: int = 65536) -> int:
    """Embed every tokenized user with the checkpoint's encoder; returns the number of users written."""
    data = open_tokenized(data_dir)
    spec = VocabSpec.from_manifest(data.manifest)
    dev = resolve_device(device)
    encoder = build_encoder(checkpoint, None, spec).to(dev).eval()
    collator = Collator(data, user_attr_offsets(spec), CollateConfig(select_prob=0.0))
    hidden = encoder.cfg.hidden
    schema = pa.schema([("user_id", data.user_ids.type), ("embedding", pa.list_(pa.float32(), hidden))])
    n = data.num_users

    def write(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            bar = tqdm(total=n, desc="embed", unit="user", disable=not progress, dynamic_ncols=True)
            for start in range(0, n, rows_per_group):
                rows = np.arange(start, min(n, start + rows_per_group))
                parts = [encoder.user_embedding(to_device(b, dev)).float().cpu().numpy()
                         for b in _tracked(eval_batches(collator, rows, batch_size), bar)]
                emb = np.concatenate(parts)  # [rows, H]
                values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), hidden)
                writer.write_table(pa.table({"user_id": data.user_ids.slice(start, len(rows)), "embedding": values},
                                            schema=schema))
            bar.close()

    atomic_write(Path(out_path), write)
    log.info("wrote %d user embeddings of width %d to %s", n, hidden, out_path)
    return n


def _tracked(batches, bar):
    for b in batches:
        yield b
        bar.update(b.batch_size)
