"""Input representation: the token grid [B, T, H] the encoder reads (docs/FORMATS.md §6, engine/data/batch.py).

Per user row of the grid::

    t = 0           CLS                 learned vector             + segment embedding (S + 1)
    t = 1 .. U      user attributes     stacked user table row     + segment embedding (S)
    word_slot       behavioural words   gather_concat_mean(actions) (-> projection) + position + segment (s)
    the rest        padding             zeros (masked out of attention as keys; their outputs are ignored)

Segment ids: 0 .. S-1 the behaviour segments in schema order, S the user attributes, S + 1 CLS.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from engine.config import ModelConfig, SegmentVocab, VocabSpec
from engine.data.batch import Batch, SegmentBatch
from kernels.gather_concat_mean import gather_concat_mean


def user_attr_offsets(spec: VocabSpec) -> list[int]:
    """Start row of each user attribute in the stacked user-attribute table (collate adds these).

    Attribute j's id i lives at row ``offsets[j] + i``; the table has ``sum(spec.user_vocab_sizes)`` rows.
    """
    return [0, *itertools.accumulate(spec.user_vocab_sizes)][: len(spec.user_vocab_sizes)]


class SegmentEmbedding(nn.Module):
    """One behaviour segment: a table per attribute, an optional projection, a position table."""

    def __init__(self, seg: SegmentVocab, hidden: int, kernel_impl: str):
        super().__init__()
        if not (len(seg.attributes) == len(seg.vocab_sizes) == len(seg.dims)) or not seg.attributes:
            raise ValueError(f"segment {seg.name!r}: attributes, vocab_sizes and dims must have one entry "
                             f"per attribute (>= 1), got {seg.attributes}, {seg.vocab_sizes}, {seg.dims}")
        self.name = seg.name
        self.kernel_impl = kernel_impl
        # Row 0 is padding: zero at init, and the kernel gives it no gradient, so it stays zero.
        self.attr = nn.ModuleDict({a: nn.Embedding(v, d, padding_idx=0)
                                   for a, v, d in zip(seg.attributes, seg.vocab_sizes, seg.dims)})
        d_cat = sum(seg.dims)
        # The concatenated attribute vector is sum(dims) wide; project when that is not H.
        self.proj = nn.Linear(d_cat, hidden, bias=False) if d_cat != hidden else None
        self.position = nn.Embedding(seg.num_positions, hidden)

    def forward(self, sb: SegmentBatch, segment_vec: torch.Tensor) -> torch.Tensor:
        """Token vectors of this segment's words, ``[n_words, H]`` (before the embedding LayerNorm)."""
        tables = [e.weight for e in self.attr.values()]
        # Zeroing the masked words' token vectors can happen before the projection: a Linear without
        # bias maps 0 to 0.  So it is always fused into the gather; position and segment stay.
        # bool [n_words], True for masked words to zero (index_put, not boolean indexing: no device sync)
        zero_mask = torch.zeros_like(sb.word_slot, dtype=torch.bool).index_put_((sb.masked,), sb.masked_zero)
        if self.proj is None:
            # One pass writes the finished token vectors: mean, zeroing, + position row + segment vector
            # (the Triton kernel reads the position table itself: no [n_words, H] temporaries).
            return gather_concat_mean(tables, sb.attr_ids, sb.word_offsets, zero_mask=zero_mask,
                                      pos_table=self.position.weight, word_pos=sb.word_pos, seg_vec=segment_vec,
                                      impl=self.kernel_impl)
        tok = gather_concat_mean(tables, sb.attr_ids, sb.word_offsets, zero_mask=zero_mask,
                                 impl=self.kernel_impl)  # [n_words, sum(dims)]
        return self.proj(tok) + (self.position(sb.word_pos) + segment_vec)  # [n_words, H]


class Embeddings(nn.Module):
    """Builds the grid: CLS, user-attribute tokens and every segment's words, then LayerNorm + dropout."""

    def __init__(self, cfg: ModelConfig, spec: VocabSpec):
        super().__init__()
        if len(spec.user_attributes) != len(spec.user_vocab_sizes):
            raise ValueError(f"user_attributes {spec.user_attributes} and user_vocab_sizes "
                             f"{spec.user_vocab_sizes} differ in length")
        self.hidden = cfg.hidden
        self.n_segments = len(spec.segments)
        self.n_user_attrs = len(spec.user_attributes)
        self.segments = nn.ModuleList(
            [SegmentEmbedding(s, cfg.hidden, cfg.kernel_impl) for s in spec.segments])
        n_user_rows = sum(spec.user_vocab_sizes)
        self.user_attr = nn.Embedding(n_user_rows, cfg.hidden) if n_user_rows else None
        self.segment = nn.Embedding(self.n_segments + 2, cfg.hidden)  # S behaviour, S: user attrs, S+1: CLS
        self.cls = nn.Parameter(torch.zeros(cfg.hidden))
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def grid(self, batch: Batch) -> torch.Tensor:
        """The summed embeddings ``[B, T, H]`` before LayerNorm; padding slots are zero."""
        B, T, H, S, U = batch.batch_size, batch.max_len, self.hidden, self.n_segments, self.n_user_attrs
        if len(batch.segments) != S:
            raise ValueError(f"batch has {len(batch.segments)} segments, the model {S}")
        device = self.cls.device
        row_start = torch.arange(B, device=device) * T  # [B] flat index of each user's t = 0

        slots = [row_start]  # CLS at t = 0
        values = [(self.cls + self.segment.weight[S + 1]).expand(B, H)]  # [B, H]
        if U:
            if batch.user_attr_ids.shape != (B, U):
                raise ValueError(f"user_attr_ids: expected [B={B}, U={U}], "
                                 f"got {list(batch.user_attr_ids.shape)}")
            slots.append((row_start[:, None] + 1 + torch.arange(U, device=device)).reshape(B * U))  # t = 1..U
            ua = self.user_attr(batch.user_attr_ids).reshape(B * U, H)  # [B, U, H] -> [B*U, H]
            values.append(ua + self.segment.weight[S])
        for s, (emb, sb) in enumerate(zip(self.segments, batch.segments)):
            slots.append(sb.word_slot)
            values.append(emb(sb, self.segment.weight[s]))  # [n_words_s, H]

        # One scatter of every real token into a zero grid; slots are distinct by construction.
        vals = torch.cat(values)  # [n_tokens, H]
        grid = vals.new_zeros(B * T, H).index_copy(0, torch.cat(slots), vals)  # [B*T, H]
        return grid.view(B, T, H)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.drop(self.norm(self.grid(batch)))  # [B, T, H]


def init_embedding_padding(module: nn.Module) -> None:
    """Zero the padding rows (row 0 of every attribute table); used by the model's weight init."""
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


__all__ = ["Embeddings", "SegmentEmbedding", "user_attr_offsets", "init_embedding_padding"]
