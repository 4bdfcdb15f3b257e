"""A wide (count) input: a linear map of the user's bag of attribute counts, read straight from a Batch.

    batch ──bag of counts x [B, n_wide] (sparse)──> b + log(1 + x) @ W ──> [B, out_dim]

Columns: every segment's attributes' vocabularies back to back, then the stacked user-attribute
table; a column's count is the number of the user's actions with that attribute value (padding id 0
left out), and 1 for each of the user's attribute values.  log(1 + count): a heavy user's 500
purchases of one genre should not swamp everything else (the logistic-regression baseline of
engine/downstream/baselines.py does the same).

Used by the Wide&Deep multi-task baseline (engine/downstream/mtl_baselines.py: its wide part) and by
fine-tuning with ``finetune.wide`` (engine/downstream/finetune.py: logits = head(h) + wide(x)).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import VocabSpec
from engine.data.batch import Batch


def action_users(batch: Batch, s: int) -> torch.Tensor:
    """int64 [n_actions]: the batch row b of every action of segment ``s``.

    A word's grid slot is ``b * max_len + t``, so its user is ``slot // max_len``; an action belongs to
    the word whose CSR range ``word_offsets[w]:word_offsets[w+1]`` holds it.
    """
    sb = batch.segments[s]
    word_user = sb.word_slot // batch.max_len  # [n_words]
    word_len = (sb.word_offsets[1:] - sb.word_offsets[:-1]).long()  # [n_words]
    return torch.repeat_interleave(word_user, word_len, output_size=sb.attr_ids.shape[0])  # [n_actions]


class WideCounts(nn.Module):
    """``forward(batch) -> [B, out_dim]``: ``bias + sum over the user's columns of log(1 + count) * W[column]``.

    ``W`` starts at zero (a linear model starts at zero; added to another model's logits, it changes
    nothing until it has learned something).  ``bias=False`` where the sum already has one (a task head).
    """

    def __init__(self, spec: VocabSpec, out_dim: int, bias: bool = True):
        super().__init__()
        # A segment's genre and another's are different columns: the same id means a different thing.
        starts, col = [], 0
        for seg in spec.segments:
            starts.append([col + sum(seg.vocab_sizes[:k]) for k in range(len(seg.vocab_sizes))])
            col += sum(seg.vocab_sizes)
        self.col_start = starts  # [segment][attribute] first column
        self.user_col = col  # user-attribute ids (collate already offsets them into the stacked table)
        self.n_wide = col + sum(spec.user_vocab_sizes)
        # The weights as an embedding table: x @ W without a dense [B, n_wide] (vocabularies can be large).
        self.table = nn.Embedding(self.n_wide, out_dim)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        nn.init.zeros_(self.table.weight)

    def wide_input(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bag of counts as COO: (row int64 [nnz], column int64 [nnz], count float32 [nnz]), one entry per
        (user, column) present: the number of the user's actions with that attribute value (padding id 0
        left out), and 1 for each user attribute."""
        B, dev = batch.batch_size, self.table.weight.device
        rows, cols = [], []
        for s, sb in enumerate(batch.segments):
            who = action_users(batch, s)  # [A]
            for k, start in enumerate(self.col_start[s]):
                ids = sb.attr_ids[:, k].long()  # [A]
                real = ids > 0
                rows.append(who[real])
                cols.append(start + ids[real])
        if batch.user_attr_ids.shape[1]:
            U = batch.user_attr_ids.shape[1]
            rows.append(torch.arange(B, device=dev).repeat_interleave(U))
            cols.append(self.user_col + batch.user_attr_ids.reshape(-1).long())
        r = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=dev)
        c = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long, device=dev)
        keys, counts = torch.unique(r * self.n_wide + c, return_counts=True)  # one entry per (user, column)
        return keys // self.n_wide, keys % self.n_wide, counts.float()

    def forward(self, batch: Batch) -> torch.Tensor:
        B = batch.batch_size
        r, c, n = self.wide_input(batch)
        w = self.table(c)  # [nnz, out_dim]
        terms = w * torch.log1p(n).to(w.dtype)[:, None]  # [nnz, out_dim]; the weights' dtype (bf16 engines)
        base = self.bias.expand(B, -1) if self.bias is not None else w.new_zeros(B, w.shape[1])
        return base.index_add(0, r, terms)  # [B, out_dim]
