"""The two straightforward UserBERT implementations that the training-step benchmark compares against.

What a competent PyTorch user would write from the paper, with the same model (sizes, masking, loss):

- (a) ``heads="all"``, the plain one: batches padded per segment (``[B, W, A, K]`` action ids), one
  ``nn.Embedding`` per attribute with a masked mean over each word's actions, ``nn.TransformerEncoder``
  (pre-LN, GELU, the same widths), and every pretext head applied at *every* grid position, followed by
  ``F.cross_entropy`` against dense probability targets ``y/|y|`` (all-zero rows, i.e. positions that
  are not masked words of that segment, contribute exactly 0).
- (b) ``heads="masked"``: the same, with the heads applied only at the masked words' positions
  (``[M, V]`` logits and dense ``[M, V]`` targets).

Both read :class:`PaddedBatch`, built from one of our collated :class:`engine.data.batch.Batch` (same users,
same masks, same labels) outside the timed region, as a DataLoader would.  With the same weights
(:func:`copy_weights_from`) and no dropout, both give our model's loss to fp32 rounding: the benchmark's
test asserts it, so the comparison is between implementations of one computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig, VocabSpec
from engine.data.batch import Batch


@dataclass
class PaddedSegment:
    ids: torch.Tensor  # int64 [B, W, A, K] action attribute ids, 0 = padding
    action_mask: torch.Tensor  # bool [B, W, A] real actions
    word_pos: torch.Tensor  # int64 [B, W]
    zero: torch.Tensor  # bool [B, W] masked words whose token vector is zeroed
    masked_b: torch.Tensor  # int64 [M] user of each masked word
    masked_w: torch.Tensor  # int64 [M] its word index within the segment
    label_offsets: list[torch.Tensor]  # per attribute: int64 [M + 1]
    label_ids: list[torch.Tensor]  # per attribute: int64 [nnz]


@dataclass
class PaddedBatch:
    segments: list[PaddedSegment]
    user_attr_ids: torch.Tensor  # int64 [B, U] (offsets into the stacked user table applied)
    key_padding: torch.Tensor  # bool [B, T], True = padding (nn.TransformerEncoder's convention)
    n_masked: int

    @property
    def batch_size(self) -> int:
        return self.user_attr_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Grid positions the encoder processes (padding included)."""
        return self.key_padding.numel()


def padded_from_batch(batch: Batch) -> PaddedBatch:
    """The same users, words, masks and labels, laid out as padded tensors (numpy, vectorised)."""
    B, T = batch.batch_size, batch.max_len
    U = batch.user_attr_ids.shape[1]
    segs, n_words_all = [], []
    for sb in batch.segments:
        slot = sb.word_slot.numpy()
        user = slot // T  # user of each word: its grid row
        nw = np.bincount(user, minlength=B)  # [B] words per user
        first = np.concatenate([[0], np.cumsum(nw)[:-1]])
        w_in_user = np.arange(len(slot)) - first[user]
        offs = sb.word_offsets.numpy().astype(np.int64)
        na = np.diff(offs)  # actions per word
        W = int(nw.max(initial=0))
        A = int(na.max(initial=0))
        K = sb.attr_ids.shape[1]
        ids = np.zeros((B, max(W, 1), max(A, 1), K), dtype=np.int64)
        amask = np.zeros((B, max(W, 1), max(A, 1)), dtype=bool)
        word_of_action = np.repeat(np.arange(len(slot)), na)
        a_in_word = np.arange(offs[-1]) - offs[:-1][word_of_action]
        ids[user[word_of_action], w_in_user[word_of_action], a_in_word] = sb.attr_ids.numpy()
        amask[user[word_of_action], w_in_user[word_of_action], a_in_word] = True
        pos = np.zeros((B, max(W, 1)), dtype=np.int64)
        pos[user, w_in_user] = sb.word_pos.numpy()
        masked = sb.masked.numpy()
        zero = np.zeros((B, max(W, 1)), dtype=bool)
        zero[user[masked], w_in_user[masked]] = sb.masked_zero.numpy()
        segs.append(PaddedSegment(
            ids=torch.from_numpy(ids), action_mask=torch.from_numpy(amask), word_pos=torch.from_numpy(pos),
            zero=torch.from_numpy(zero), masked_b=torch.from_numpy(user[masked]),
            masked_w=torch.from_numpy(w_in_user[masked]),
            label_offsets=[o.long() for o in sb.label_offsets], label_ids=[i.long() for i in sb.label_ids]))
        n_words_all.append((nw, max(W, 1)))
    # Grid: [CLS] [U user attributes] [long words padded to W_long] [short words padded to W_short]
    T_pad = 1 + U + sum(W for _, W in n_words_all)
    real = np.zeros((B, T_pad), dtype=bool)
    real[:, :1 + U] = True
    start = 1 + U
    for nw, W in n_words_all:
        real[:, start:start + W] = np.arange(W)[None, :] < nw[:, None]
        start += W
    return PaddedBatch(segs, batch.user_attr_ids.long(), torch.from_numpy(~real),
                       int(sum(sb.masked.shape[0] for sb in batch.segments)))


class PlainSegmentEmbedding(nn.Module):
    def __init__(self, vocab_sizes: list[int], dims: list[int], num_positions: int, hidden: int):
        super().__init__()
        self.attr = nn.ModuleList([nn.Embedding(v, d, padding_idx=0) for v, d in zip(vocab_sizes, dims)])
        self.proj = nn.Linear(sum(dims), hidden, bias=False) if sum(dims) != hidden else None
        self.position = nn.Embedding(num_positions, hidden)

    def forward(self, seg: PaddedSegment, segment_vec: torch.Tensor) -> torch.Tensor:
        m = seg.action_mask.unsqueeze(-1).float()  # [B, W, A, 1]
        count = m.sum(dim=2).clamp(min=1.0)  # [B, W, 1]
        # masked mean over the word's actions, per attribute, then concatenated
        x = torch.cat([(emb(seg.ids[..., k]) * m).sum(dim=2) / count for k, emb in enumerate(self.attr)], dim=-1)
        x = x.masked_fill(seg.zero.unsqueeze(-1), 0.0)  # [B, W, D]: zero 80% of the masked words
        if self.proj is not None:
            x = self.proj(x)
        return x + self.position(seg.word_pos) + segment_vec  # [B, W, H]


class PlainUserBERT(nn.Module):
    """The baselines' model; ``heads`` = "all" (a) or "masked" (b)."""

    def __init__(self, cfg: ModelConfig, spec: VocabSpec, heads: str = "all"):
        super().__init__()
        if heads not in ("all", "masked"):
            raise ValueError(f"heads: expected 'all' or 'masked', got {heads!r}")
        H, S = cfg.hidden, len(spec.segments)
        self.heads_mode = heads
        self.segments = nn.ModuleList([PlainSegmentEmbedding(s.vocab_sizes, s.dims, s.num_positions, H)
                                       for s in spec.segments])
        self.user_attr = nn.Embedding(max(sum(spec.user_vocab_sizes), 1), H)
        self.segment = nn.Embedding(S + 2, H)
        self.cls = nn.Parameter(torch.randn(H) * cfg.init_std)
        self.norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(H, cfg.heads, cfg.ffn_mult * H, cfg.dropout, activation="gelu",
                                           layer_norm_eps=cfg.layer_norm_eps, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(H, eps=cfg.layer_norm_eps),
                                             enable_nested_tensor=False)
        self.heads = nn.ModuleList([nn.ModuleList([nn.Linear(H, v) for v in s.vocab_sizes]) for s in spec.segments])

    def encode(self, pb: PaddedBatch) -> torch.Tensor:
        B, S = pb.batch_size, len(self.segments)
        U = pb.user_attr_ids.shape[1]
        parts = [(self.cls + self.segment.weight[S + 1]).expand(B, 1, -1)]  # [B, 1, H]
        if U:
            parts.append(self.user_attr(pb.user_attr_ids) + self.segment.weight[S])  # [B, U, H]
        parts += [emb(seg, self.segment.weight[s]) for s, (emb, seg) in enumerate(zip(self.segments, pb.segments))]
        x = self.drop(self.norm(torch.cat(parts, dim=1)))  # [B, T, H]
        return self.encoder(x, src_key_padding_mask=pb.key_padding)

    def loss(self, pb: PaddedBatch, normalize: bool = True) -> torch.Tensor:
        hidden = self.encode(pb)  # [B, T, H]
        B, T, H = hidden.shape
        total = hidden.new_zeros(())
        start = 1 + pb.user_attr_ids.shape[1]
        for heads, seg in zip(self.heads, pb.segments):
            M = seg.masked_b.shape[0]
            t = start + seg.masked_w  # [M] grid column of each masked word
            for head, offs, ids in zip(heads, seg.label_offsets, seg.label_ids):
                counts = offs[1:] - offs[:-1]  # [M] labels per masked word
                row = torch.repeat_interleave(torch.arange(M), counts)  # masked word of each label
                val = 1.0 / counts.clamp(min=1).float()[row] if normalize else torch.ones(ids.shape[0])
                V = head.out_features
                if self.heads_mode == "all":
                    logits = head(hidden).reshape(B * T, V)  # [B*T, V] every position
                    target = torch.zeros(B * T, V)  # dense probability targets, zero off the masked words
                    target.index_put_(((seg.masked_b * T + t)[row], ids), val, accumulate=True)
                else:
                    logits = head(hidden[seg.masked_b, t])  # [M, V] masked words only
                    target = torch.zeros(M, V)
                    target.index_put_((row, ids), val, accumulate=True)
                total = total + F.cross_entropy(logits, target, reduction="sum")
            start += seg.ids.shape[1]
        return total / max(pb.n_masked, 1)

    @torch.no_grad()
    def copy_weights_from(self, ours: nn.Module) -> None:
        """Load an engine.model.userbert.UserBERT's weights (for the equivalence test)."""
        emb = ours.embeddings
        self.cls.copy_(emb.cls)
        self.segment.weight.copy_(emb.segment.weight)
        if emb.user_attr is not None:
            self.user_attr.weight.copy_(emb.user_attr.weight)
        self.norm.load_state_dict(emb.norm.state_dict())
        for mine, theirs in zip(self.segments, emb.segments):
            for a, b in zip(mine.attr, theirs.attr.values()):
                a.weight.copy_(b.weight)
            if mine.proj is not None:
                mine.proj.weight.copy_(theirs.proj.weight)
            mine.position.weight.copy_(theirs.position.weight)
        for layer, block in zip(self.encoder.layers, ours.encoder.blocks):
            layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
            layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
            layer.self_attn.out_proj.load_state_dict(block.attn.out.state_dict())
            layer.linear1.load_state_dict(block.mlp.fc.state_dict())
            layer.linear2.load_state_dict(block.mlp.out.state_dict())
            layer.norm1.load_state_dict(block.norm1.state_dict())
            layer.norm2.load_state_dict(block.norm2.state_dict())
        self.encoder.norm.load_state_dict(ours.encoder.norm.state_dict())
        for mine, theirs in zip(self.heads, ours.heads.heads.values()):
            for a, b in zip(mine, theirs.values()):
                a.load_state_dict(b.state_dict())
