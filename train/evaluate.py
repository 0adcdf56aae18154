"""Exact distributed full ranking: every rank ranks ITS users (each user on one rank) against all items; what is
all-reduced is integer: the number of users at each rank 1..max(ks) and the user count. Metric sums are computed
from that histogram in a fixed order, so the result is bit-identical for every world size (summing float metric
sums across ranks would differ in the last bits with the summation order). No padded duplicates: ranks that run out of users run
masked dummy chunks (so ZeRO-3's per-forward collectives stay in step) which count for nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from cammsr.base import ModelOutput
from cammsr.metrics import ranking_metric_sums, sums_to_means
from train.data import Batch, LocalSequences, eval_batches
from train.distributed import all_reduce_sum
from train.step import model_inputs


def last_position(output: ModelOutput, seq_len: torch.Tensor) -> ModelOutput:
    """All-positions outputs ([B, L, M, d]) read at the last valid position, like prefix outputs ([B, M, d])."""
    if output.user_vectors.dim() == 3:
        return output
    rows = torch.arange(seq_len.shape[0], device=seq_len.device)
    offset = None if output.score_offset is None else output.score_offset[rows, seq_len - 1]
    return ModelOutput(user_vectors=output.user_vectors[rows, seq_len - 1], valid=output.valid, score_offset=offset)


def _dummy(max_len: int) -> Batch:
    seq = torch.zeros(1, max_len, dtype=torch.long)
    seq[0, 0] = 1
    return Batch(seq, torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long),
                 torch.zeros(1, dtype=torch.bool))


@torch.no_grad()
def evaluate(model, table, items, local: LocalSequences, split: str, max_len: int, batch_size: int,
             ks: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """{"ndcg@5": ..., "mrr@10": ..., "recall@10": ..., "count": users} for `split` ("valid" | "test")."""
    was_training = model.training
    model.eval()
    id_rows = table.all_rows()  # collective; every rank gets the full table once
    candidates = model.item_candidates(id_rows.to(dtype), *(None if t is None else t.to(dtype)
                                                           for t in (items.text, items.image)))
    chunks = torch.tensor([-(-len(local) // batch_size)], dtype=torch.long, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(chunks, op=torch.distributed.ReduceOp.MAX)
    batches = list(eval_batches(local, split, max_len, batch_size))
    batches += [_dummy(max_len)] * (int(chunks) - len(batches))
    top = max(ks)
    histogram = torch.zeros(top + 2, dtype=torch.long, device=device)  # [rank 1..top, > top] at 1..top+1
    for batch in batches:
        batch = batch.to(device)
        seq_emb = id_rows[batch.item_seq] * (batch.item_seq != 0)[..., None]
        output = model(*model_inputs(batch, seq_emb, items, dtype))
        ranks = model.rank_targets(last_position(output, batch.seq_len), candidates, batch.targets)
        histogram += torch.bincount(ranks.clamp(max=top + 1)[batch.real], minlength=top + 2)
    all_reduce_sum(histogram)
    model.train(was_training)
    histogram = histogram.cpu()
    levels = torch.arange(1, top + 2)
    sums = ranking_metric_sums(levels, ks, valid=histogram[1:].double())
    means = sums_to_means(sums)
    means["count"] = int(histogram.sum())
    return means


__all__ = ["evaluate", "last_position", "np"]
