"""The transformer encoder: L pre-LayerNorm blocks on scaled_dot_product_attention, a final LayerNorm.

Why pre-LN (LayerNorm inside the residual branch, before attention and the MLP) rather than BERT's
post-LN: the residual stream is then an identity path from the embeddings to the final LayerNorm,
so gradients reach every layer at the same scale and training is stable at the paper's constant
lr 1e-4 with no warmup (post-LN is known to need warmup).  The final LayerNorm normalises the
stream, which pre-LN leaves unnormalised, before the heads read it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)  # q, k, v in one matmul
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = cfg.attn_dropout
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, H]``; key_bias ``[B, 1, 1, T]`` in x's dtype: 0 for real keys, -inf for padding."""
        B, T, H = x.shape
        A = self.heads
        q, k, v = self.qkv(x).view(B, T, 3, A, H // A).permute(2, 0, 3, 1, 4)  # 3 x [B, A, T, H/A]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, H)  # [B, A, T, H/A] -> [B, T, H]
        return self.drop(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden)
        self.out = nn.Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))  # BERT's erf GELU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_bias)
        x = x + self.mlp(self.norm2(x))
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor, last: int = 1) -> torch.Tensor:
        """x ``[B, T, H]``; padding_mask bool ``[B, T]`` (True: real token) -> ``[B, T, H]``.

        Padding is masked as keys only: every query still has CLS to attend to, so no row is all
        masked (no NaN), and padded queries' outputs are simply never read.  The mask is passed as an
        additive float bias rather than a bool mask: measured 25-40% faster fwd+bwd in SDPA on CPU.

        ``last`` = k > 1: the mean over the top k blocks of each block's output read through the final
        LayerNorm (``norm(x_l)``), so every layer's state is on the scale of the final hidden state (pre-LN
        leaves the residual stream unnormalised, and its scale grows with depth); k = 1 is the final state.
        """
        n = len(self.blocks)
        if not 1 <= last <= n:
            raise ValueError(f"last: expected 1..{n} (the encoder's layers), got {last}")
        B, T = padding_mask.shape
        # [B, T] -> [B, 1, 1, T], broadcast over heads and queries
        key_bias = x.new_zeros(B, 1, 1, T).masked_fill(~padding_mask[:, None, None, :], float("-inf"))
        top = []
        for i, block in enumerate(self.blocks):
            x = block(x, key_bias)
            if i >= n - last:
                top.append(self.norm(x))
        return top[0] if last == 1 else torch.stack(top).mean(dim=0)  # [B, T, H]
