"""Pretraining heads: masked multi-label classification (docs/FORMATS.md §6).

For every segment s and attribute k, a Linear(H -> V_k) reads the final hidden state of each
masked word of s, and the loss is the softmax cross entropy against the set of values k takes in
the word (kernels/multi_label_ce.py).  Only masked words are evaluated: with ~15% of words masked
this is ~7x fewer rows than running the heads on the whole grid, and the heads dominate the FLOPs
(docs/KERNELS.md, multi_label_softmax_ce).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from engine.config import MaskingConfig, ModelConfig, VocabSpec
from engine.data.batch import Batch
from kernels.multi_label_ce import multi_label_softmax_ce_grouped


class PretrainHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: VocabSpec):
        super().__init__()
        self.kernel_impl = cfg.kernel_impl
        # per segment, the heads' names "segment.attribute" (the stats keys)
        self.names = [[f"{s.name}.{a}" for a in s.attributes] for s in spec.segments]
        self.heads = nn.ModuleDict({
            s.name: nn.ModuleDict({a: nn.Linear(cfg.hidden, v) for a, v in zip(s.attributes, s.vocab_sizes)})
            for s in spec.segments
        })

    def forward(self, hidden: torch.Tensor, batch: Batch,
                masking: MaskingConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """hidden ``[B, T, H]`` -> (loss, stats); see :meth:`engine.model.userbert.UserBERT.pretrain_loss`."""
        B, T, H = hidden.shape
        flat = hidden.reshape(B * T, H)  # [B*T, H]: word_slot indexes this
        head_sums, head_rows, total = [], [], hidden.new_zeros((), dtype=torch.float32)
        for seg_heads, sb in zip(self.heads.values(), batch.segments):
            rows = flat.index_select(0, sb.word_slot.index_select(0, sb.masked))  # [M_s, H] masked words only
            losses = multi_label_softmax_ce_grouped(
                rows, [h.weight for h in seg_heads.values()], [h.bias for h in seg_heads.values()],
                sb.label_offsets, sb.label_ids, masking.normalize_labels, impl=self.kernel_impl,
            )  # [K_s, M_s] fp32
            per_head = losses.sum(dim=1)  # [K_s]
            # Also with M_s = 0: the (zero) sum stays connected to every head, so each parameter gets
            # a gradient every step (DDP/ZeRO expect that).
            total = total + per_head.sum()
            head_sums.append(per_head)
            head_rows += [sb.masked.shape[0]] * per_head.shape[0]
        n_masked = sum(sb.masked.shape[0] for sb in batch.segments)
        loss = total / max(n_masked, 1) if masking.loss_reduction == "mean" else total

        # One device->host copy for all statistics.
        sums = torch.cat(head_sums).detach().tolist()
        names = [n for seg in self.names for n in seg]
        stats: dict[str, float] = {f"loss/{n}": s / max(m, 1) for n, s, m in zip(names, sums, head_rows)}
        stats["masked_words"] = float(n_masked)
        return loss, stats


class UserBagHeads(nn.Module):
    """The user-level objective (``model.user_bag_weight``): from the pooled user state, the distribution of
    each behaviour attribute's values over all of the user's actions.

    Per segment s and attribute k, a Linear(H -> V_k) reads the pooled state ``[B, H]``; the loss is the
    softmax cross entropy against the user's value counts / their total (padding ids excluded), averaged
    over the users with actions in s, summed over heads.  Plain torch: the logits are only ``[B, V_k]``.
    """

    def __init__(self, cfg: ModelConfig, spec: VocabSpec):
        super().__init__()
        self.heads = nn.ModuleDict({
            s.name: nn.ModuleDict({a: nn.Linear(cfg.hidden, v) for a, v in zip(s.attributes, s.vocab_sizes)})
            for s in spec.segments
        })

    def forward(self, pooled: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        B = pooled.shape[0]
        total = pooled.new_zeros((), dtype=torch.float32)
        parts = []
        for seg_heads, sb in zip(self.heads.values(), batch.segments):
            lens = (sb.word_offsets[1:] - sb.word_offsets[:-1]).long()  # [W] actions per word
            act_user = torch.repeat_interleave(sb.word_slot // batch.max_len, lens)  # [A] user row of each action
            for k, head in enumerate(seg_heads.values()):
                ids = sb.attr_ids[:, k].long()
                real = ids > 0
                u, i = act_user[real], ids[real]
                count = torch.bincount(u, minlength=B).float()  # [B] the user's actions with a value of k
                logp = torch.log_softmax(head(pooled).float(), dim=-1)  # [B, V_k]
                users = (count > 0).sum().clamp_min(1)
                loss = -(logp[u, i] / count[u]).sum() / users
                total = total + loss
                parts.append(loss)
        stats = {"loss/user_bag": float(torch.stack(parts).sum().detach()) if parts else 0.0}
        return total, stats
