"""Modality-swap contrastive learning (Eq. 16-18): the swap augmentation and the InfoNCE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def modality_swap(first: torch.Tensor, second: torch.Tensor, valid: torch.Tensor, prob: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exchange each valid position of two [B, L, d] sequences with probability `prob` (Eq. 17).

    Padding positions are never swapped. Returns the two augmented sequences and the [B, L] swap mask.
    """
    draw = torch.rand(valid.shape, device=valid.device, generator=generator)
    swapped = (draw < prob) & valid
    mask = swapped[..., None]
    return torch.where(mask, second, first), torch.where(mask, first, second), swapped


def info_nce(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 1.0,
             bidirectional: bool = False, reduction: str = "mean", groups: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Eq. 18: -log softmax_j(cos(a_i, b_j) / tau)[i], the same user's other view as the positive and the
    other users of the batch as negatives. `bidirectional` averages it with the b -> a direction. `groups` [N]:
    rows of one group (the prefixes of one window) are not each other's negatives.

    Computed in fp32. For negatives from the global batch, gather both views across ranks and call this on
    the gathered tensors.
    """
    with torch.autocast(device_type=view_a.device.type, enabled=False):
        a = F.normalize(view_a.float(), dim=-1)
        b = F.normalize(view_b.float(), dim=-1)
        logits = a @ b.T / temperature
        if groups is not None:
            same = groups[:, None] == groups[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(logits, labels, reduction=reduction)
        if bidirectional:
            loss = (loss + F.cross_entropy(logits.T, labels, reduction=reduction)) / 2
    return loss


def pair_loss(view_a: torch.Tensor, view_b: torch.Tensor, real: torch.Tensor, valid: torch.Tensor | None,
              cfg) -> torch.Tensor:
    """One MSCL pair's InfoNCE over its anchors. [B, d] views (`mscl_anchors="last"`) have one anchor per real
    row; [B, L, d] views (`"every_prefix"`) one per valid position of a real row, each prefix an anchor as in the
    paper's batches of prefixes, with the other prefixes of its own window left out of its negatives."""
    if view_a.dim() == 2:
        a, b, groups = view_a[real], view_b[real], None
    else:
        mask = valid & real[:, None]
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
        a, b, groups = view_a[mask], view_b[mask], rows[mask]
    return info_nce(a, b, cfg.mscl_temperature, cfg.mscl_bidirectional, cfg.mscl_reduction, groups)
