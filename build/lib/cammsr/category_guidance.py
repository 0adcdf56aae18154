"""Category guidance (Eq. 8-10): modality weights from how well each modality predicts the item's categories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class CategoryGuidance(nn.Module):
    """Per-modality linear classifiers over the category vocabulary; d_i^m = BCE(sigmoid(W_c^m e_m + b), y).

    Multi-label within a level: BCE over that level's multi-hot vector, summed (Eq. 9, "sum") or averaged
    ("mean") over the level's classes. Hierarchies: one difference per level, pooled by max / mean / min
    (Section V-K). Weights w_i = softmax over modalities of +d (literal) or -d. Items without a label
    (`has_cat` False), padding, or calls without labels get equal weights 1/M. All of it runs in fp32.
    """

    def __init__(self, cfg: ModelConfig, num_categories: int):
        super().__init__()
        levels = cfg.category_levels if cfg.category_levels is not None else [0] * num_categories
        if num_categories < 1:
            raise ValueError(f"num_categories={num_categories}: use_category_guidance needs a category vocabulary")
        if len(levels) != num_categories:
            raise ValueError(f"ModelConfig.category_levels has {len(levels)} entries, "
                             f"the category vocabulary has {num_categories}")
        self.num_modalities = cfg.num_modalities
        self.sign = 1.0 if cfg.category_weight_sign == "positive" else -1.0
        self.pooling = cfg.category_pooling
        self.detach = cfg.detach_category_difference
        self.weight = nn.Parameter(torch.empty(cfg.num_modalities, num_categories, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_modalities, num_categories))
        membership = F.one_hot(torch.tensor(levels), max(levels) + 1).float()  # [C, levels]
        if cfg.category_bce_reduction == "mean":
            membership = membership / membership.sum(0).clamp_min(1.0)
        self.register_buffer("level_reduction", membership, persistent=False)

    def reset_parameters_with(self, init) -> None:
        for weight in self.weight.data:
            init(weight)
        nn.init.zeros_(self.bias)

    def differences(self, e: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e [..., M, d], labels [..., C] -> (pooled difference d [..., M], per-class BCE [..., M, C]), fp32."""
        with torch.autocast(device_type=e.device.type, enabled=False):
            logits = torch.einsum("...md,mcd->...mc", e.float(), self.weight.float()) + self.bias.float()
            targets = labels.float().unsqueeze(-2).expand_as(logits)
            bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
            per_level = bce @ self.level_reduction  # [..., M, levels]
            if self.pooling == "max":
                pooled = per_level.amax(dim=-1)
            elif self.pooling == "min":
                pooled = per_level.amin(dim=-1)
            else:
                pooled = per_level.mean(dim=-1)
        return pooled, bce

    def forward(self, e: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None,
                has_label: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """e [B, L, M, d] -> (modality weights [B, L, M] fp32, mean classifier BCE over labelled items)."""
        equal = torch.full(e.shape[:-1], 1.0 / self.num_modalities, device=e.device)
        if labels is None:
            return equal, torch.zeros((), device=e.device)
        difference, bce = self.differences(e, labels)
        if self.detach:
            difference = difference.detach()
        weights = (self.sign * difference).softmax(dim=-1)
        labelled = valid if has_label is None else valid & has_label
        weights = torch.where(labelled[..., None], weights, equal)
        per_item = bce.mean(dim=(-1, -2))
        category_loss = (per_item * labelled).sum() / labelled.sum().clamp_min(1)
        return weights, category_loss
