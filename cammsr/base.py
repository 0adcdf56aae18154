"""What every sequential recommender here returns, and the losses / ranking built on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .config import ModelConfig
from .mscl import info_nce, pair_loss
from .scoring import full_softmax_cross_entropy, sampled_recommendation_loss, target_ranks, top_k_items


@dataclass
class BatchTerm:
    """A model's own auxiliary loss over its training batch (HM4SR's IDCL and PCL, FindRec's IICM, TAME's CL),
    computed on the GLOBAL batch so that N processes train as one: `tensors` hold rows aligned with the batch rows
    ([B, ...], floating or integer); the trainer gathers them from every rank (gradients flow back to each rank's
    rows) and adds `weight * fn(tensors, real)` to the loss, `real` [B] marking the batch's real rows.
    `sequence_tensors`: the indices of tensors whose dim 1 is the sequence ([B, L, ...]), padded to max_seq_len
    before the gather since each rank's batch is as wide as its longest window."""

    name: str
    weight: float
    tensors: tuple[torch.Tensor, ...]
    fn: Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]
    sequence_tensors: tuple[int, ...] = ()

    def along_sequence(self) -> list[bool]:
        return [index in self.sequence_tensors for index in range(len(self.tensors))]


@dataclass
class TargetContrast:
    """InfoNCE between one modality's user vectors and the candidate vectors of their targets in that modality,
    the other scored targets of the GLOBAL batch as negatives, cosine similarity / temperature (HM4SR's IDCL,
    Eq. 23; TAME's CL, Eq. 16). The trainer builds it from the targets, which the model's forward never sees. In
    all-positions mode every scored position is an anchor, and the other positions of its own window are left out
    of its negatives (the papers' batches hold one prefix per sequence), as MSCL's every_prefix does."""

    name: str
    modality: int
    weight: float
    temperature: float

    def batch_term(self, output: "ModelOutput", target_vectors: torch.Tensor, targets: torch.Tensor) -> BatchTerm:
        """The term on this batch: `target_vectors` [..., M, d] shaped like `output.user_vectors`, `targets` [B] or
        [B, L] (0 = not scored)."""
        user, target = output.user_vectors[..., self.modality, :], target_vectors[..., self.modality, :]
        scored = (targets > 0).to(user.dtype)
        along = (0, 1, 2) if targets.dim() == 2 else ()
        return BatchTerm(self.name, self.weight, (user, target, scored),
                         partial(target_contrast_loss, temperature=self.temperature), along)


def target_contrast_loss(tensors: tuple[torch.Tensor, ...], real: torch.Tensor, temperature: float) -> torch.Tensor:
    """TargetContrast's InfoNCE over the scored targets of the real rows: (user [B(, L), d], target [B(, L), d],
    scored [B(, L)])."""
    user, target, scored = tensors
    mask = (scored > 0) & (real if scored.dim() == 1 else real[:, None])
    if not mask.any():  # nothing scored on this batch: a zero that keeps the graph
        return user.sum() * 0.0
    groups = None
    if scored.dim() == 2:
        groups = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return info_nce(user[mask], target[mask], temperature, groups=groups)


def target_vectors_of(targets: torch.Tensor, candidates: torch.Tensor | None = None,
                      sampled: "SampledCandidates | None" = None) -> torch.Tensor:
    """Candidate vectors [*targets.shape, M, d] of each target (zeros where targets == 0): rows of the whole
    catalogue's `candidates`, or the sampled loss's `target_vectors` (the scored targets in row order)."""
    if candidates is not None:
        return candidates[targets]
    rows = sampled.target_vectors
    vectors = rows.new_zeros(targets.shape + rows.shape[1:])
    vectors[targets > 0] = rows
    return vectors


@dataclass
class ModelOutput:
    """user_vectors: Z^m per modality, [B, M, d] in prefix mode, [B, L, M, d] in all-positions mode.
    valid: [B, L] non-padding positions. score_offset: per-user constant of the literal Eq. 15 position
    term ([B] or [B, L]) or None. modality_weights [B, L, M] and expert_weights [B, L, G, K] are for
    monitoring (None for models without them); expert_groups names the G routed groups (None: G = the modalities,
    in config order). category_loss: scalar (None when off).
    mscl_views: the (Z_aug^{m1}, Z_aug^{m2}) pairs of MSCL (empty when off), [B, d] at each row's last position or
    [B, L, d] at every position (`mscl_anchors`); the loss is computed from them, with this batch's negatives
    (`loss`) or the global batch's (the trainer). batch_terms, target_contrasts: the model's other auxiliary losses
    (training only).
    """

    user_vectors: torch.Tensor
    valid: torch.Tensor
    score_offset: torch.Tensor | None = None
    modality_weights: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    expert_groups: tuple[str, ...] | None = None
    category_loss: torch.Tensor | None = None
    mscl_views: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    batch_terms: list[BatchTerm] = field(default_factory=list)
    target_contrasts: list[TargetContrast] = field(default_factory=list)

    def all_batch_terms(self, targets: torch.Tensor, candidates: torch.Tensor | None = None,
                        sampled: "SampledCandidates | None" = None) -> list[BatchTerm]:
        """The model's batch terms and its target contrasts as batch terms on these targets."""
        if not self.target_contrasts:
            return list(self.batch_terms)
        vectors = target_vectors_of(targets, candidates, sampled)
        return [*self.batch_terms, *(c.batch_term(self, vectors, targets) for c in self.target_contrasts)]

    def flat_user_vectors(self) -> torch.Tensor:
        """[R, M * d] rows matching `targets.reshape(-1)`."""
        return self.user_vectors.flatten(-2).flatten(0, -2)

    def flat_score_offset(self) -> torch.Tensor | None:
        return None if self.score_offset is None else self.score_offset.reshape(-1)

    def expert_usage(self) -> torch.Tensor | None:
        """Mean routing weight of each expert over valid positions, [G, K]."""
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
    auxiliary: torch.Tensor | None = None  # the weighted sum of the model's batch terms

    def logged(self) -> torch.Tensor:
        """[total, recommendation, mscl, category, auxiliary], detached."""
        auxiliary = self.category.new_zeros(()) if self.auxiliary is None else self.auxiliary
        return torch.stack([self.total, self.recommendation, self.mscl, self.category, auxiliary]).detach()


class SequentialRecommender(nn.Module):
    """Trainer-facing interface shared by every model.

    forward(item_seq [B, L], seq_len [B], id_emb [B, L, d], text_feat, image_feat, cat_labels, has_cat, time_seq)
      -> ModelOutput. Sequences are left-aligned, padding (0) at the end. time_seq [B, L] float64 seconds (None
      when unknown: models that need times refuse it).
    item_candidates(id_rows, text_rows, image_rows) -> [N + 1, M, d] (row = item id, row 0 padding).
    candidates_of(ids, id_rows, text_table, image_table) -> [U, M, d]: those of some items, given the catalogue.
    """

    cfg: ModelConfig

    def item_candidates(self, id_rows: torch.Tensor, text_rows: torch.Tensor | None = None,
                        image_rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def candidates_of(self, ids: torch.Tensor, id_rows: torch.Tensor, text_table: torch.Tensor | None = None,
                      image_table: torch.Tensor | None = None) -> torch.Tensor:
        """`item_candidates` of the distinct items `ids` [U]: their ID rows [U, d] and the catalogue's feature tables
        [N + 1, ...] (None: not read), whose rows are read in the ID rows' dtype -> [U, M, d]."""
        return self.item_candidates(id_rows, *(None if table is None else table[ids].to(id_rows.dtype)
                                               for table in (text_table, image_table)))

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
        terms = output.all_batch_terms(targets, candidates, sampled)
        auxiliary = sum((term.weight * term.fn(term.tensors, real) for term in terms), zero)
        return LossTerms(total + auxiliary, recommendation, mscl, category, auxiliary)

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
