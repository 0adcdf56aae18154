"""Per-user scoring of a finished run through its best checkpoint (`train.recommend.RunRecommender`), for the
benchmarks that look inside a run's metrics: each user computed as `cammsr recommend` computes one (no padding),
users of one history width batched together."""
from __future__ import annotations

from collections import defaultdict

import torch

from cammsr.metrics import expected_metric
from train.recommend import RunRecommender


def user_vectors_after(recommender: RunRecommender, histories: list[list[int]],
                       times: list[list[float]] | None = None, batch_size: int = 256) -> torch.Tensor:
    """[users, M, d] (SASRec: [users, d]): each user's vectors after the given history (its last max_seq_len) and
    its interaction times (None: not known; time-aware models refuse that)."""
    by_width = defaultdict(list)
    for user, history in enumerate(histories):
        by_width[min(len(history), recommender.max_len)].append(user)
    rows: list[torch.Tensor | None] = [None] * len(histories)
    for users in by_width.values():
        for start in range(0, len(users), batch_size):
            chunk = users[start:start + batch_size]
            output = recommender.same_width_outputs([histories[u] for u in chunk],
                                                    None if times is None else [times[u] for u in chunk])
            for user, vectors in zip(chunk, output.user_vectors.float()):
                rows[user] = vectors
    return torch.stack(rows)


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
