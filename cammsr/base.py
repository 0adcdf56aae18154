"""What every sequential recommender here returns, and the losses / ranking built on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import ModelConfig
from .mscl import pair_loss
from .scoring import full_softmax_cross_entropy, sampled_recommendation_loss, target_ranks, top_k_items


@dataclass
class ModelOutput:
    """user_vectors: Z^m per modality, [B, M, d] in prefix mode, [B, L, M, d] in all-positions mode.
    valid: [B, L] non-padding positions. score_offset: per-user constant of the literal Eq. 15 position
    term ([B] or [B, L]) or None. modality_weights [B, L, M] and expert_weights [B, L, M, K] are for
    monitoring (None for models without them). category_loss: scalar (None when off).
    mscl_views: the (Z_aug^{m1}, Z_aug^{m2}) pairs of MSCL (empty when off), [B, d] at each row's last position or
    [B, L, d] at every position (`mscl_anchors`); the loss is computed from them, with this batch's negatives
    (`loss`) or the global batch's (the trainer).
    """

    user_vectors: torch.Tensor
    valid: torch.Tensor
    score_offset: torch.Tensor | None = None
    modality_weights: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    category_loss: torch.Tensor | None = None
    mscl_views: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def flat_user_vectors(self) -> torch.Tensor:
        """[R, M * d] rows matching `targets.reshape(-1)`."""
        return self.user_vectors.flatten(-2).flatten(0, -2)

    def flat_score_offset(self) -> torch.Tensor | None:
        return None if self.score_offset is None else self.score_offset.reshape(-1)

    def expert_usage(self) -> torch.Tensor | None:
        """Mean routing weight of each expert over valid positions, [M, K]."""
        if self.expert_weights is None:
            return None
        mask = self.valid[..., None, None].to(self.expert_weights.dtype)
        return (self.expert_weights * mask).sum(dim=(0, 1)) / mask.sum(dim=(0, 1)).clamp_min(1)


@dataclass
class SampledCandidates:
    """Inputs of the sampled losses, built by the trainer with `item_candidates` on the sampled rows.
    target_vectors [T, M, d] of the scored targets (targets > 0, in row order); negatives shared by all rows
    (negative_vectors [S, M, d], negative_ids [S]) or each target's own (negative_ids [T, S]; negative_vectors
    the distinct rows [U, M, d] that negative_index [T, S] points into); log_q: log sampling
    probabilities (None: uniform); sampling_rate: S / (N - 1), what gBCE calibrates with."""

    target_vectors: torch.Tensor
    negative_vectors: torch.Tensor
    negative_ids: torch.Tensor
    negative_log_q: torch.Tensor | None = None
    target_log_q: torch.Tensor | None = None
    sampling_rate: float = 0.0
    negative_index: torch.Tensor | None = None


@dataclass
class LossTerms:
    total: torch.Tensor
    recommendation: torch.Tensor
    mscl: torch.Tensor
    category: torch.Tensor


class SequentialRecommender(nn.Module):
    """Trainer-facing interface shared by CAMMSR and SASRec.

    forward(item_seq [B, L], seq_len [B], id_emb [B, L, d], text_feat, image_feat, cat_labels, has_cat)
      -> ModelOutput. Sequences are left-aligned, padding (0) at the end.
    item_candidates(id_rows, text_rows, image_rows) -> [N + 1, M, d] (row = item id, row 0 padding).
    """

    cfg: ModelConfig

    def item_candidates(self, id_rows: torch.Tensor, text_rows: torch.Tensor | None = None,
                        image_rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fit_feature_statistics(self, text_table: torch.Tensor | None, image_table: torch.Tensor | None) -> None:
        """Fix any input statistics from the catalogue's frozen feature tables ([N + 1, F], zero rows = absent).
        Called once before training; ID-only models have none."""

    def loss(self, output: ModelOutput, targets: torch.Tensor, candidates: torch.Tensor | None = None,
             sampled: SampledCandidates | None = None) -> LossTerms:
        """Eq. 20: L_SR + lambda * L_MSCL (+ the optional auxiliary category loss).

        targets: [B] (prefix) or [B, L] (all positions), 0 = ignore. Full softmax needs `candidates`
        (all items); sampled softmax needs `sampled`.
        """
        user, flat_targets = output.flat_user_vectors(), targets.reshape(-1)
        if self.cfg.loss_type == "full_softmax":
            if candidates is None:
                raise ValueError("loss_type='full_softmax' needs candidates for the whole catalogue")
            recommendation = full_softmax_cross_entropy(user, candidates.flatten(1), flat_targets,
                                                        self.cfg.score_chunk_size)
        else:
            if sampled is None:
                raise ValueError(f"loss_type={self.cfg.loss_type!r} needs sampled candidates")
            recommendation = sampled_recommendation_loss(user, flat_targets, sampled, self.cfg.loss_type,
                                                         self.cfg.gbce_t)
        zero = recommendation.new_zeros(())
        real = torch.ones(output.valid.shape[0], dtype=torch.bool, device=output.valid.device)
        mscl = sum((pair_loss(z_i, z_j, real, output.valid, self.cfg) for z_i, z_j in output.mscl_views),
                   zero) * self.cfg.mscl_pair_share
        category = zero if output.category_loss is None else output.category_loss
        total = recommendation + self.cfg.mscl_weight * mscl
        if self.cfg.aux_category_loss_weight:
            total = total + self.cfg.aux_category_loss_weight * category
        return LossTerms(total, recommendation, mscl, category)

    @torch.no_grad()
    def rank_targets(self, output: ModelOutput, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Full-ranking rank of each target among all items (see scoring.target_ranks for ties)."""
        return target_ranks(output.flat_user_vectors(), candidates.flatten(1), targets.reshape(-1),
                            self.cfg.score_chunk_size, output.flat_score_offset())

    @torch.no_grad()
    def recommend(self, output: ModelOutput, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, item ids) per user row."""
        return top_k_items(output.flat_user_vectors(), candidates.flatten(1), k, self.cfg.score_chunk_size,
                           output.flat_score_offset())
