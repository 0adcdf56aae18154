"""Scoring users against the item catalogue (Eq. 15, 19) without materialising [users x items x d].

Conventions: `candidates` is a [N + 1, D] table indexed by item id; row 0 is padding and never a candidate.
User vectors are [R, D]; for several modalities D = M * d, which makes the single dot product equal to
the sum of the per-modality dot products of Eq. 15. Targets are item ids in 1..N; 0 marks a row to ignore.
Everything is computed in fp32, also under autocast.

Ties: `target_ranks` gives rank = 1 + the number of items scoring strictly higher than the target, and the
number of items scoring exactly as the target does (the target included); `cammsr.metrics` turns the pair into the
metrics' expectation under a random order of the tied items. Both are independent of item order; the target's own
score is read from the same matmul that scores the others. `top_k_items` lists tied items by ascending id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import warnings

import torch
import torch.nn.functional as F


def _fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def _chunks(num_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """Item-id ranges [start, end) covering ids 1..num_rows-1 (row 0 is padding)."""
    for start in range(1, num_rows, chunk_size):
        yield start, min(start + chunk_size, num_rows)


def _row_weights(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights = (targets > 0).float()
    return weights, weights.sum().clamp_min(1.0)


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean CE over all items, one item chunk at a time in forward and backward (logits are recomputed)."""

    @staticmethod
    def forward(ctx, user, candidates, targets, chunk_size):
        lse = torch.full((user.shape[0],), float("-inf"), device=user.device)
        for start, end in _chunks(candidates.shape[0], chunk_size):
            lse = torch.logaddexp(lse, torch.logsumexp(user @ candidates[start:end].T, dim=1))
        target_logit = (user * candidates[targets]).sum(dim=1)
        weights, count = _row_weights(targets)
        ctx.save_for_backward(user, candidates, targets, lse, weights / count)
        ctx.chunk_size = chunk_size
        return ((lse - target_logit) * weights).sum() / count

    @staticmethod
    def backward(ctx, grad_output):
        user, candidates, targets, lse, row_scale = ctx.saved_tensors
        scale = grad_output * row_scale
        grad_user = -scale[:, None] * candidates[targets]
        grad_candidates = torch.zeros_like(candidates)
        grad_candidates.index_add_(0, targets, -scale[:, None] * user)
        for start, end in _chunks(candidates.shape[0], ctx.chunk_size):
            chunk = candidates[start:end]
            probs = torch.exp(user @ chunk.T - lse[:, None]) * scale[:, None]
            grad_user += probs @ chunk
            grad_candidates[start:end] += probs.T @ user
        return grad_user, grad_candidates, None, None


def full_softmax_cross_entropy(user: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int) -> torch.Tensor:
    """Eq. 19: mean over non-ignored rows of -log softmax over items 1..N of the target's score.

    Catalogues larger than `chunk_size` go through a chunked autograd function whose memory is
    O(R x chunk_size) in forward and backward.
    """
    with torch.autocast(device_type=user.device.type, enabled=False):
        user, candidates = _fp32(user, candidates)
        if candidates.shape[0] - 1 > chunk_size:
            return _ChunkedSoftmaxCrossEntropy.apply(user, candidates, targets, chunk_size)
        losses = F.cross_entropy(user @ candidates[1:].T, targets - 1, ignore_index=-1, reduction="none")
        weights, count = _row_weights(targets)
        return (losses * weights).sum() / count


def _csr(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, size: tuple[int, int]):
    # column indices are unsorted and may repeat within a row (negatives are drawn with replacement): the sampled
    # matmul and the CSR x dense product take each stored entry on its own, so the invariant check would only refuse
    with warnings.catch_warnings():  # torch calls its CSR layout beta, once per process: nothing for a user to act on
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
        return torch.sparse_csr_tensor(crow_indices, col_indices, values, size, check_invariants=False)


class _RowScores(torch.autograd.Function):
    """scores [R, S] = user [R, D] . rows[index] with index [R, S] into rows [U, D], as the stored values of a sparse
    [R, U] matrix: a sampled dense-dense matmul forward, CSR x dense backward. Neither the [R, U] score block nor the
    [R, S, D] gathered rows is ever built: O(R S D) work in O(R S) memory, where scoring the whole block of distinct
    rows is O(R U D) (U ~ 12,000 against S = 512 on Beauty), and a gather's backward is a scattered accumulation."""

    @staticmethod
    def forward(ctx, user, rows, index):
        num_rows, per_row = index.shape
        crow = torch.arange(0, index.numel() + 1, per_row, device=index.device)
        col = index.reshape(-1)
        pattern = _csr(crow, col, user.new_zeros(index.numel()), (num_rows, rows.shape[0]))
        scores = torch.sparse.sampled_addmm(pattern, user, rows.T, beta=0.0).values().view(num_rows, per_row)
        ctx.save_for_backward(user, rows, crow, col)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        user, rows, crow, col = ctx.saved_tensors
        grad = grad_scores.reshape(-1)
        grad_user = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_user = _csr(crow, col, grad, (user.shape[0], rows.shape[0])) @ rows
        if ctx.needs_input_grad[1]:
            # the transposed pattern, [U, R]: entries grouped by the row of `rows` they read; entry p is user p // S's
            # (int32 keys: torch sorts them 2.5x faster than int64, in the same stable order)
            order = torch.argsort(col.int() if rows.shape[0] <= torch.iinfo(torch.int32).max else col, stable=True)
            crow_by_item = torch.zeros(rows.shape[0] + 1, dtype=crow.dtype, device=crow.device)
            crow_by_item[1:] = torch.bincount(col, minlength=rows.shape[0]).cumsum(0)
            by_item = _csr(crow_by_item, order // grad_scores.shape[1], grad[order], (rows.shape[0], user.shape[0]))
            grad_rows = by_item @ user
        return grad_user, grad_rows, None


def _per_row_scores(user: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """user [R, D] . rows[index] [R, S, D] -> [R, S]. A table of no more rows than S (a small catalogue) is scored
    whole: that block is no bigger than the sampled one (torch's sampled matmul refuses more entries than it holds)."""
    if rows.shape[0] <= index.shape[1]:
        return (user @ rows.T).gather(1, index)
    return _RowScores.apply(user, rows, index)


def sampled_logits(user: torch.Tensor, target_vectors: torch.Tensor, targets: torch.Tensor,
                   negative_vectors: torch.Tensor, negative_ids: torch.Tensor,
                   negative_log_q: torch.Tensor | None = None, target_log_q: torch.Tensor | None = None,
                   negative_index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [R, 1 + S] in fp32: column 0 the row's target, then its S negatives, shared by all rows
    (negative_vectors [S, D], ids and log_q [S]) or each row's own (ids and log_q [R, S]; negative_vectors a table
    [U, D] that negative_index [R, S] points into). log_q = log of each item's
    sampling probability, subtracted (logQ correction; omit for uniform sampling, where it is a constant). A
    negative equal to the row's target (an accidental hit) is -inf: removed from that row."""
    with torch.autocast(device_type=user.device.type, enabled=False):
        user, target_vectors, negative_vectors = _fp32(user, target_vectors, negative_vectors)
        positive = (user * target_vectors).sum(dim=1, keepdim=True)
        if negative_index is not None:
            negative = _per_row_scores(user, negative_vectors, negative_index)
        else:
            negative = user @ negative_vectors.T
            negative_ids = negative_ids[None, :]
        if target_log_q is not None:
            positive = positive - target_log_q.float()[:, None]
        if negative_log_q is not None:
            log_q = negative_log_q.float()
            negative = negative - (log_q[None, :] if log_q.dim() == 1 else log_q)
        negative = negative.masked_fill(negative_ids == targets[:, None], float("-inf"))
        return torch.cat([positive, negative], dim=1)


def _row_mean(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    weights, count = _row_weights(targets)
    return (losses * weights).sum() / count


def sampled_softmax_cross_entropy(user: torch.Tensor, target_vectors: torch.Tensor, targets: torch.Tensor,
                                  negative_vectors: torch.Tensor, negative_ids: torch.Tensor,
                                  negative_log_q: torch.Tensor | None = None,
                                  target_log_q: torch.Tensor | None = None,
                                  negative_index: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over non-ignored rows of -log softmax of the target among itself and its negatives (`sampled_logits`)."""
    logits = sampled_logits(user, target_vectors, targets, negative_vectors, negative_ids, negative_log_q,
                            target_log_q, negative_index)
    return _row_mean(-logits.log_softmax(dim=1)[:, 0], targets)


def gbce_beta(sampling_rate: float, t: float) -> float:
    """gSASRec's calibration exponent: beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = S / (N - 1) the negative
    sampling rate; t = 0 gives plain BCE (beta = 1), t = 1 gives beta = alpha."""
    return sampling_rate * (t * (1.0 - 1.0 / sampling_rate) + 1.0 / sampling_rate)


def gbce_loss(user: torch.Tensor, target_vectors: torch.Tensor, targets: torch.Tensor,
              negative_vectors: torch.Tensor, negative_ids: torch.Tensor, beta: float,
              negative_index: torch.Tensor | None = None) -> torch.Tensor:
    """gBCE (Petrov & Macdonald, gSASRec, RecSys 2023): per row -(log sigma(s+)^beta + sum_j log(1 - sigma(s_j)))
    / (S + 1), i.e. BCE with the positive's probability raised to beta, which undoes the overconfidence that
    negative sampling teaches; mean over non-ignored rows. Accidental hits contribute nothing (log(1 - 0))."""
    logits = sampled_logits(user, target_vectors, targets, negative_vectors, negative_ids,
                            negative_index=negative_index)
    positive, negative = logits[:, 0], logits[:, 1:]
    losses = (beta * F.softplus(-positive) + F.softplus(negative).sum(dim=1)) / logits.shape[1]
    return _row_mean(losses, targets)


def sampled_recommendation_loss(user: torch.Tensor, targets: torch.Tensor, sampled, loss_type: str,
                                gbce_t: float) -> torch.Tensor:
    """The recommendation loss of a sampled `loss_type` ("sampled_softmax" | "gbce") on the rows of `user` [R, D]
    whose targets [R] are > 0; `sampled` (cammsr.base.SampledCandidates) holds the vectors of those scored targets,
    in row order, and of the negatives (shared [S, M, d], or per scored target: a table of distinct rows
    [U, M, d] with negative_index [T, S])."""
    scored = targets > 0
    user, targets = user[scored], targets[scored]
    target_vectors = sampled.target_vectors.reshape(user.shape)
    negative_vectors = sampled.negative_vectors.flatten(-2)
    if loss_type == "gbce":
        return gbce_loss(user, target_vectors, targets, negative_vectors, sampled.negative_ids,
                         gbce_beta(sampled.sampling_rate, gbce_t), sampled.negative_index)
    target_log_q = None if sampled.target_log_q is None else sampled.target_log_q.reshape(-1)
    return sampled_softmax_cross_entropy(user, target_vectors, targets, negative_vectors, sampled.negative_ids,
                                         sampled.negative_log_q, target_log_q, sampled.negative_index)


def _offset(scores: torch.Tensor, score_offset: torch.Tensor | None) -> torch.Tensor:
    return scores if score_offset is None else scores + score_offset.float()[:, None]


class TargetRanks(NamedTuple):
    """rank [R]: 1 + items scoring strictly higher than the target; ties [R]: items scoring equal, target included."""
    rank: torch.Tensor
    ties: torch.Tensor


@torch.no_grad()
def target_ranks(user: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                 score_offset: torch.Tensor | None = None) -> TargetRanks:
    """Rank (1 = best) of each row's target among items 1..N and its tie count; see the module docstring."""
    with torch.autocast(device_type=user.device.type, enabled=False):
        user, candidates = _fp32(user, candidates)
        target_score = torch.zeros(user.shape[0], device=user.device)
        for start, end in _chunks(candidates.shape[0], chunk_size):
            scores = _offset(user @ candidates[start:end].T, score_offset)
            inside = (targets >= start) & (targets < end)
            column = (targets - start).clamp(0, end - start - 1)
            target_score = torch.where(inside, scores.gather(1, column[:, None]).squeeze(1), target_score)
        greater = torch.zeros(user.shape[0], dtype=torch.long, device=user.device)
        equal = torch.zeros(user.shape[0], dtype=torch.long, device=user.device)
        for start, end in _chunks(candidates.shape[0], chunk_size):
            higher, tied = count_higher_and_tied(_offset(user @ candidates[start:end].T, score_offset), target_score)
            greater += higher
            equal += tied
    return TargetRanks(greater + 1, equal.clamp_min(1))


def count_higher_and_tied(scores: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of fp32 scores [R, C] (C <= 2**24, ModelConfig.score_chunk_size's bound): the columns scoring
    strictly higher than reference [R] and those scoring equal, int64. The comparisons are written as 0/1 floats and
    summed, exact below 2**24 columns: summing a bool tensor first converts each element to int64, several times
    the comparison's cost."""
    hits = torch.empty_like(scores)
    higher = torch.gt(scores, reference[:, None], out=hits).sum(dim=1).long()
    tied = torch.eq(scores, reference[:, None], out=hits).sum(dim=1).long()
    return higher, tied


@torch.no_grad()
def top_k_items(user: torch.Tensor, candidates: torch.Tensor, k: int, chunk_size: int,
                score_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k items (ids in 1..N) per row and their scores, keeping only k per row across chunks; equal scores
    in ascending id order."""
    with torch.autocast(device_type=user.device.type, enabled=False):
        user, candidates = _fp32(user, candidates)
        best_scores = user.new_empty(user.shape[0], 0)
        best_ids = torch.empty(user.shape[0], 0, dtype=torch.long, device=user.device)
        for start, end in _chunks(candidates.shape[0], chunk_size):
            scores = _offset(user @ candidates[start:end].T, score_offset)
            ids = torch.arange(start, end, device=user.device).expand_as(scores)
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_ids = torch.cat([best_ids, ids], dim=1)
            # stable: the survivors (lower ids, ties already by id) stay ahead of this chunk's tied ids
            sorted_scores, index = merged_scores.sort(dim=1, descending=True, stable=True)
            keep = min(k, merged_scores.shape[1])
            best_scores, best_ids = sorted_scores[:, :keep], merged_ids.gather(1, index[:, :keep])
    return best_scores, best_ids
