"""The Batch: what collate hands the model (docs/FORMATS.md §5).

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


# -- transport: one buffer per batch ---------------------------------------------------------------
# A Batch is ~10 + 6·S tensors.  Collate writes them all into one flat byte buffer plus a small spec
# (Collator.packed; pack_batch does the same for any Batch): pinning is one call instead of dozens, a
# GPU gets the batch in one host-to-device copy, and the tensors are views of the buffer (no copy).

ALIGN = 64  # every array starts on a cache line; also satisfies any dtype's alignment for .view()


@dataclass
class PackedBatch:
    buffer: torch.Tensor  # uint8 [nbytes]
    spec: tuple  # (layout of the segments, max_len, [(dtype, shape, offset)] in walk order)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(self.buffer.pin_memory(), self.spec)


def flat_tensors(batch: Batch) -> list[torch.Tensor]:
    """Every tensor of ``batch`` in a fixed order (the packing order)."""
    out = [batch.user_attr_ids, batch.seq_lens, batch.users]
    for s in batch.segments:
        out += [s.attr_ids, s.word_offsets, s.word_pos, s.word_slot, s.masked, s.masked_zero]
        out += s.label_offsets + s.label_ids
    return out


class BufferLayout:
    """Places arrays in one buffer: each at the next cache-line boundary, recorded as (dtype, shape, offset)."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.dtype, tuple[int, ...], int]] = []
        self.nbytes = 0

    def add(self, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Reserve room for one array; returns its byte offset."""
        offset = self.nbytes
        n = dtype.itemsize
        for d in shape:
            n *= d
        self.entries.append((dtype, tuple(shape), offset))
        self.nbytes += -(-n // ALIGN) * ALIGN
        return offset


def pack_batch(batch: Batch) -> PackedBatch:
    """Copy every tensor of ``batch`` (on CPU) into one aligned uint8 buffer."""
    tensors = flat_tensors(batch)
    layout = BufferLayout()
    offsets = [layout.add(t.dtype, tuple(t.shape)) for t in tensors]
    buffer = torch.empty(max(layout.nbytes, 1), dtype=torch.uint8)
    for t, o in zip(tensors, offsets, strict=True):
        n = t.numel() * t.element_size()
        if n:
            buffer[o:o + n] = t.contiguous().view(-1).view(torch.uint8)
    segments = tuple(len(s.label_ids) for s in batch.segments)
    return PackedBatch(buffer, (segments, batch.max_len, tuple(layout.entries)))


def unpack_batch(packed: PackedBatch) -> Batch:
    """The Batch of :func:`pack_batch`, its tensors views of ``packed.buffer``."""
    layout, max_len, entries = packed.spec
    buf = packed.buffer
    n = buf.numel()
    typed: dict[torch.dtype, torch.Tensor] = {}  # the whole buffer as each dtype: one op per tensor below

    def view(e) -> torch.Tensor:
        dtype, shape, o = e
        base = typed.get(dtype)
        if base is None:
            base = typed[dtype] = buf[:n - n % dtype.itemsize].view(dtype)
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        return base.as_strided(shape, strides[::-1], base.storage_offset() + o // dtype.itemsize)

    ts = iter([view(e) for e in entries])
    user_attr_ids, seq_lens, users = next(ts), next(ts), next(ts)
    segments = []
    for n_attr in layout:
        fixed = [next(ts) for _ in range(6)]
        lo = [next(ts) for _ in range(n_attr)]
        li = [next(ts) for _ in range(n_attr)]
        segments.append(SegmentBatch(*fixed, label_offsets=lo, label_ids=li))
    return Batch(segments=segments, user_attr_ids=user_attr_ids, seq_lens=seq_lens, max_len=max_len, users=users)
