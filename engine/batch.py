"""The Batch: what collate hands the model (DESIGN.md §3, refined in docs/FORMATS.md).

Everything is flat and CSR-style, with no padding inside a segment.  Only the token grid that the
encoder sees is padded, to the batch's own longest sequence.

Token grid, per user row b (length ``seq_lens[b]``, padded to ``max_len``)::

    [CLS] [user-attribute tokens x U] [long-term words ...] [short-term words ...] [pad ...]

A word's ``slot`` is its flat index ``b * max_len + t`` in that grid.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SegmentBatch:
    """One behaviour segment (long- or short-term) of a batch, K = its number of attributes."""

    attr_ids: torch.Tensor  # int32 [n_actions, K]   attribute ids of every action, word by word
    word_offsets: torch.Tensor  # int32 [n_words + 1]  CSR: actions of word w are rows offsets[w]:offsets[w+1]
    word_pos: torch.Tensor  # int32 [n_words]       position id (days or hours since the window start)
    word_slot: torch.Tensor  # int64 [n_words]       flat index into the [B * max_len] token grid
    masked: torch.Tensor  # int64 [M]             indices (into this segment's words) of the selected words
    masked_zero: torch.Tensor  # bool [M]              True: zero the word's token vector (80% of selected)
    label_offsets: list[torch.Tensor]  # per attribute k: int32 [M + 1]  CSR over the masked words
    label_ids: list[torch.Tensor]  # per attribute k: int32 [nnz_k] distinct values of k in each masked word

    @property
    def n_words(self) -> int:
        return self.word_pos.shape[0]


@dataclass
class Batch:
    segments: list[SegmentBatch]  # in schema order
    user_attr_ids: torch.Tensor  # int32 [B, U]  ids into the stacked user-attribute table (offsets applied)
    seq_lens: torch.Tensor  # int32 [B]     tokens per user, CLS included
    max_len: int  # T: the grid's padded length (the batch's longest sequence)
    users: torch.Tensor  # int64 [B]     dataset row of each user (to join labels)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    def apply(self, fn) -> Batch:
        """A new Batch with ``fn`` applied to every tensor (device moves, pinning)."""

        def walk(x):
            if isinstance(x, torch.Tensor):
                return fn(x)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, SegmentBatch):
                return SegmentBatch(**{f.name: walk(getattr(x, f.name)) for f in fields(x)})
            return x

        return Batch(**{f.name: walk(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self.apply(torch.Tensor.pin_memory)

    def padding_mask(self) -> torch.Tensor:
        """bool [B, T]: True where a real token sits."""
        t = torch.arange(self.max_len, device=self.seq_lens.device)
        return t[None, :] < self.seq_lens[:, None]
