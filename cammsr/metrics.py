"""Leave-one-out ranking metrics from integer ranks, as sums and counts so ranks can be summed exactly.

With one relevant item at rank r (1 = best): NDCG@K = 1 / log2(r + 1), MRR@K = 1 / r, Recall@K = Hit@K = 1,
each when r <= K and 0 otherwise. Sums are float64.
"""

from __future__ import annotations

import torch


def ranking_metric_sums(ranks: torch.Tensor, ks: tuple[int, ...] = (5, 10),
                        valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ranks [R] (int) -> {"ndcg@K", "mrr@K", "recall@K": sum over rows, "count": number of rows}.

    `valid` [R] bool excludes rows (e.g. padding samples added to even out distributed batches).
    """
    ranks = ranks.to(torch.float64)
    weight = torch.ones_like(ranks) if valid is None else valid.to(torch.float64)
    sums = {"count": weight.sum()}
    for k in ks:
        hit = (ranks <= k).to(torch.float64) * weight
        sums[f"ndcg@{k}"] = (hit / torch.log2(ranks + 1)).sum()
        sums[f"mrr@{k}"] = (hit / ranks).sum()
        sums[f"recall@{k}"] = hit.sum()
    return sums


def sums_to_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Divide every metric sum by the count (after any cross-rank all-reduce of the sums)."""
    count = float(sums["count"])
    if count == 0:
        raise ValueError("no evaluated rows: count is 0")
    return {name: float(value) / count for name, value in sums.items() if name != "count"}
