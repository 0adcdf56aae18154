"""Leave-one-out ranking metrics from integer ranks and tie counts, as sums and counts so they can be summed exactly.

A target's `rank` is 1 + the number of items scoring strictly higher; `ties` counts the items scoring exactly as
the target does, the target included (1 when no other item ties). The metrics are their expectation under a
uniformly random order of the tied items: the target is equally likely at each position rank .. rank + ties - 1,
so NDCG@K = mean over those positions p of [p <= K] / log2(p + 1), MRR@K likewise with 1 / p, Recall@K = Hit@K
with 1. Why the expectation and not the pessimistic count: a model that scores everything alike then gets exactly
what a random ranking gets (not 1, as with the optimistic count, nor 0, as with the pessimistic one), and a model
with distinct scores gets the plain metrics. Sums are float64.
"""

from __future__ import annotations

from collections import Counter

import torch

METRICS = ("ndcg", "mrr", "recall")


def _gain(metric: str, positions: torch.Tensor) -> torch.Tensor:
    positions = positions.to(torch.float64)
    return {"ndcg": lambda: 1.0 / torch.log2(positions + 1), "mrr": lambda: 1.0 / positions,
            "recall": lambda: torch.ones_like(positions)}[metric]()


def expected_metric(metric: str, k: int, ranks: torch.Tensor, ties: torch.Tensor | None = None) -> torch.Tensor:
    """[R] float64: `metric`@k of each row ("ndcg" | "mrr" | "recall"), expected over its tied positions.
    Rows without ties get the plain gain, bit for bit."""
    ranks = ranks.to(torch.long).cpu()
    ties = torch.ones_like(ranks) if ties is None else ties.to(torch.long).cpu().clamp_min(1)
    plain = torch.where(ranks <= k, _gain(metric, ranks), torch.zeros(ranks.shape, dtype=torch.float64))
    if bool((ties == 1).all()):
        return plain
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), _gain(metric, torch.arange(1, k + 1)).cumsum(0)])
    first, last = (ranks - 1).clamp(0, k), (ranks + ties - 1).clamp(0, k)
    tied = (cumulative[last] - cumulative[first]) / ties.to(torch.float64)
    return torch.where(ties == 1, plain, tied)


def ranking_metric_sums(ranks: torch.Tensor, ks: tuple[int, ...] = (5, 10), valid: torch.Tensor | None = None,
                        ties: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ranks [R] (int), ties [R] (int, default 1) -> {"ndcg@K", "mrr@K", "recall@K": sum over rows, "count"}.

    `valid` [R] (bool, or float weights) excludes rows (e.g. padding samples added to even out distributed batches)
    or counts a row several times (a histogram of (rank, ties) pairs).
    """
    weight = torch.ones(ranks.shape[0], dtype=torch.float64) if valid is None else valid.cpu().to(torch.float64)
    sums = {"count": weight.sum()}
    for k in ks:
        for metric in METRICS:
            sums[f"{metric}@{k}"] = (expected_metric(metric, k, ranks, ties) * weight).sum()
    return sums


def rank_tie_histogram(ranks: torch.Tensor, ties: torch.Tensor, top: int) -> Counter:
    """{(rank, ties): rows} of the rows that can score at some K <= top (rank <= top); the others add 0 to
    every metric sum. Counters of several processes add up exactly, in any order."""
    inside = ranks <= top
    pairs = torch.stack([ranks[inside], ties[inside]], dim=1).cpu().tolist()
    return Counter(map(tuple, pairs))


def histogram_metric_sums(histogram: Counter, count: int, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Metric sums of a (rank, ties) histogram over `count` rows in all, summed in sorted key order (the same
    floats for every split of the rows across processes)."""
    keys = sorted(histogram)
    ranks = torch.tensor([key[0] for key in keys], dtype=torch.long).reshape(-1)
    ties = torch.tensor([key[1] for key in keys], dtype=torch.long).reshape(-1)
    weight = torch.tensor([histogram[key] for key in keys], dtype=torch.float64).reshape(-1)
    sums = ranking_metric_sums(ranks, ks, valid=weight, ties=ties)
    sums["count"] = torch.tensor(float(count), dtype=torch.float64)
    return sums


def sums_to_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Divide every metric sum by the count (after any cross-rank all-reduce of the sums)."""
    count = float(sums["count"])
    if count == 0:
        raise ValueError("no evaluated rows: count is 0")
    return {name: float(value) / count for name, value in sums.items() if name != "count"}
