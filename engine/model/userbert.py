"""UserBERT: embeddings -> pre-LN transformer encoder -> masked multi-label heads.

    batch ──Embeddings──> x [B, T, H] ──Encoder──> hidden [B, T, H]
                                                   ├─ hidden[:, 0]            user embedding (CLS)
                                                   └─ hidden at masked words  PretrainHeads -> loss

The pieces live in engine/model/embeddings.py, engine/model/encoder.py and engine/model/heads.py; the fused ops
they call live in kernels/ (engine imports kernels, never the reverse).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engine.config import MaskingConfig, ModelConfig, VocabSpec
from engine.data.batch import Batch
from engine.model.embeddings import Embeddings, init_embedding_padding, user_attr_offsets
from engine.model.encoder import Encoder
from engine.model.heads import PretrainHeads, UserBagHeads

__all__ = ["UserBERT", "user_attr_offsets"]


class UserBERT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: VocabSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.embeddings = Embeddings(cfg, spec)
        self.encoder = Encoder(cfg)
        self.heads = PretrainHeads(cfg, spec)
        self.bag_heads = UserBagHeads(cfg, spec) if cfg.user_bag_weight > 0 else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's init: N(0, init_std) weights, zero biases, LayerNorm 1 / 0, zero padding rows."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            init_embedding_padding(module)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Embeddings):
            nn.init.normal_(module.cls, std=std)

    def encode(self, batch: Batch, layers: int = 1) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (padding rows hold values that mean nothing).

        ``layers`` = k > 1: the mean of the last k layers' states, each through the final LayerNorm
        (engine/model/encoder.py), the "last-k layers" representation; k must be 1..cfg.layers.
        """
        return self.encoder(self.embeddings(batch), batch.padding_mask(), layers)

    def user_embedding(self, batch: Batch, pooling: str = "cls", layers: int = 1) -> torch.Tensor:
        """The user representation ``[B, H]`` that fine-tuning and `embed` use.

        "cls": the first token's hidden state, as in the paper.  "mean": the mean of the final hidden
        states of all of the user's real tokens; those of words are trained by the pretext task to
        describe their word, so their mean summarises the whole history without any fine-tuning.
        ``layers``: pool the mean of the last k layers' states instead of the last one's (:meth:`encode`).
        """
        return pool(self.encode(batch, layers), batch, pooling)

    def pretrain_head(self, segment: str, attribute: str) -> nn.Linear:
        """The pretext head of one attribute (fine-tuning over the same vocabulary may start from it)."""
        return self.heads.heads[segment][attribute]

    def pretrain_loss(self, batch: Batch, masking: MaskingConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """The masked multi-label loss and statistics.

        loss: summed over every head (s, k) and masked word, then divided by the number of masked
        words when ``masking.loss_reduction == "mean"`` (fp32 scalar, 0 when nothing is masked).
        stats: ``"loss/<segment>.<attribute>"``, each head's mean loss over its segment's masked
        words (float), and ``"masked_words"`` (float).  With ``model.user_bag_weight > 0`` the loss
        adds that weight times the user-level bag loss (engine/model/heads.py, ``"loss/user_bag"``); with
        ``model.contrastive_weight > 0``, that weight times the contrastive loss (:func:`info_nce`,
        ``"loss/contrastive"``).
        """
        x = self.embeddings(batch)  # [B, T, H]
        real = batch.padding_mask()  # [B, T]
        hidden = self.encoder(x, real)  # [B, T, H]
        loss, stats = self.heads(hidden, batch, masking)
        if self.bag_heads is not None:
            bag, bag_stats = self.bag_heads(pool(hidden, batch, "mean"), batch)
            loss = loss + self.cfg.user_bag_weight * bag
            stats.update(bag_stats)
        if self.cfg.contrastive_weight > 0:
            # The second view: the same input with a random crop of the tokens (dropped ones masked as keys,
            # left out of the mean); the first view is the masked-word pass itself.
            keep = real & (torch.rand(real.shape, device=real.device) < self.cfg.contrastive_keep)
            keep[:, 0] = True  # CLS: every query needs a key
            cropped = self.encoder(x, keep)  # [B, T, H]
            c = info_nce(masked_mean(hidden, real), masked_mean(cropped, keep), self.cfg.contrastive_temperature)
            loss = loss + self.cfg.contrastive_weight * c
            stats["loss/contrastive"] = float(c.detach())
        return loss, stats

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` states, bool ``[B, T]`` -> ``[B, H]``: the mean over the kept tokens."""
    w = keep.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views ``[B, H]`` of the same B users: user i's view a should be most
    similar (cosine / temperature) to its own view b among all B, and the other way round."""
    a = nn.functional.normalize(a.float(), dim=-1)
    b = nn.functional.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature  # [B, B]
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def pool(hidden: torch.Tensor, batch: Batch, pooling: str) -> torch.Tensor:
    """``[B, T, H]`` final states -> ``[B, H]``: the first token's ("cls") or the mean over real tokens ("mean")."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling: expected 'cls' or 'mean', got {pooling!r}")
    return masked_mean(hidden, batch.padding_mask())
