"""One training step's maths: model inputs, the global-batch loss, and MSCL with negatives from the global batch.

Global-batch equivalence: the loss of each term is this rank's SHARE of the global mean (local sum / global
count x world size). DeepSpeed averages dense gradients and TorchRec divides sparse gradients by the world size, so
N processes compute exactly the gradient of one process on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cammsr.base import LossTerms, SampledCandidates
from cammsr.mscl import pair_loss
from cammsr.scoring import full_softmax_cross_entropy, sampled_recommendation_loss


def model_inputs(batch, seq_emb: torch.Tensor, items, dtype: torch.dtype) -> tuple:
    """Positional arguments of model.forward for a batch (features gathered by item id: `items` is the catalogue's
    ItemInputs or a stream-mode step's StepFeatures; the batch's timestamps last, float64)."""
    seq = batch.item_seq
    text, image = (None if rows is None else rows.to(dtype) for rows in (items.rows("text", seq),
                                                                         items.rows("image", seq)))
    cats = None if items.categories is None else items.categories[seq]
    has = None if items.has_category is None else items.has_category[seq] & batch.real[:, None]
    return seq, batch.seq_len, seq_emb.to(dtype), text, image, cats, has, batch.time_seq


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy and returns this rank's slice
    (works on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, tensor):
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_rows(tensor: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Every rank's rows, in rank order. `width`: first zero-pad dim 1 of a [B, W, ...] tensor to it, since a
    batch is as wide as its longest window, which differs between ranks, and all_gather needs one shape."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    if width is not None:
        tensor = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, width - tensor.shape[1]))
    return _GatherWithGrad.apply(tensor)


def global_count(local: torch.Tensor) -> torch.Tensor:
    total = local.detach().clone().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total.clamp_min(1.0)


def training_loss(model, output, candidates: torch.Tensor | None, batch, mscl_negatives: str,
                  sampled: SampledCandidates | None = None) -> LossTerms:
    """Loss terms of this rank, scaled so that their average over ranks is the global-batch loss.

    Full softmax: `candidates` [N + 1, M, d] is the whole catalogue. Sampled losses: `sampled` holds the vectors
    of this rank's scored targets (rows with target > 0, in order) and of their negatives."""
    cfg = model.cfg
    world = dist.get_world_size() if dist.is_initialized() else 1
    targets = batch.targets.reshape(-1)
    scored = targets > 0  # padding positions are never scored against the catalogue
    n_local = scored.sum()
    share = n_local.float() * world / global_count(n_local)
    if sampled is None:
        recommendation = full_softmax_cross_entropy(output.flat_user_vectors()[scored], candidates.flatten(1),
                                                    targets[scored], cfg.score_chunk_size)
    else:
        recommendation = sampled_recommendation_loss(output.flat_user_vectors(), targets, sampled, cfg.loss_type,
                                                     cfg.gbce_t)
    zero = recommendation.new_zeros(())
    total = recommendation * share
    mscl = zero
    if output.mscl_views:
        pair_weight = cfg.mscl_weight * cfg.mscl_pair_share  # lambda on each pair's InfoNCE
        real, valid = batch.real, output.valid
        every_prefix = cfg.mscl_anchors == "every_prefix"  # views [B, W, d] instead of [B, d]
        width = cfg.max_seq_len if every_prefix else None
        if mscl_negatives == "global":
            # every rank computes the same global InfoNCE; the gather's backward sums the copies (x world)
            # and the engines' averaging divides by world: exactly the single-process gradient.
            real = gather_rows(real[:, None].float()).squeeze(1) > 0
            valid = gather_rows(valid.float(), width) > 0 if every_prefix else None
        else:
            anchors = (valid & real[:, None]).sum() if every_prefix else real.sum()
            scale = (anchors.float() * world / global_count(anchors) if cfg.mscl_reduction == "mean"
                     else float(world))
        for view_a, view_b in output.mscl_views:
            if mscl_negatives == "global":
                term = pair_loss(gather_rows(view_a, width), gather_rows(view_b, width), real, valid, cfg)
            else:
                term = pair_loss(view_a, view_b, real, valid, cfg) * scale
            mscl = mscl + term
            total = total + pair_weight * term
        mscl = mscl * cfg.mscl_pair_share  # L_MSCL as lambda weighs it: the pairs' sum or mean
    category = zero if output.category_loss is None else output.category_loss
    if cfg.aux_category_loss_weight:
        total = total + cfg.aux_category_loss_weight * category * share
    auxiliary = zero
    batch_terms = output.all_batch_terms(batch.targets, candidates, sampled)
    if batch_terms:
        # like MSCL's global negatives: every rank computes the same global-batch value, the gathers' backward
        # sums the copies and the engines' averaging divides by world: the single-process gradient
        real = gather_rows(batch.real[:, None].float()).squeeze(1) > 0
        for term in batch_terms:
            gathered = tuple(gather_rows(tensor, cfg.max_seq_len if along_sequence else None)
                             for tensor, along_sequence in zip(term.tensors, term.along_sequence()))
            weighted = term.weight * term.fn(gathered, real)
            auxiliary = auxiliary + weighted
        total = total + auxiliary
    # each term is this rank's share: their mean over ranks is the global-batch value (what is logged)
    return LossTerms(total, recommendation * share, mscl, category * share, auxiliary)
