"""Per-user scoring of a finished run through its best checkpoint (`train.recommend.RunRecommender`), for the
benchmarks that look inside a run's metrics: one user per forward pass, as `cammsr recommend` does."""
from __future__ import annotations

import torch

from cammsr.metrics import expected_metric
from train.recommend import RunRecommender


def user_vectors_after(recommender: RunRecommender, histories: list[list[int]],
                       times: list[list[float]] | None = None) -> torch.Tensor:
    """[users, M, d] (SASRec: [users, d]): each user's vectors after the given history (its last max_seq_len) and
    its interaction times (None: not known; time-aware models refuse that)."""
    times = times or [None] * len(histories)
    return torch.stack([recommender.user_output(history, when).user_vectors[0].float()
                        for history, when in zip(histories, times)])


def ndcg_at_10_per_user(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores [users, items] (column k = item k + 1), targets [users] item ids -> [users] NDCG@10 (float64),
    tied items counted as in evaluation (cammsr.metrics: the expectation over a random order of the ties)."""
    target_score = scores.gather(1, (targets - 1)[:, None])
    ranks = (scores > target_score).sum(dim=1) + 1
    return expected_metric("ndcg", 10, ranks, (scores == target_score).sum(dim=1))


def split_histories(sequences: list[list[int]], split: str) -> tuple[list[list[int]], torch.Tensor]:
    """Leave-one-out histories and targets: "valid" predicts the second-to-last item, "test" the last."""
    cut = {"valid": 2, "test": 1}[split]
    return [list(s[:-cut]) for s in sequences], torch.tensor([s[-cut] for s in sequences])
