"""Per-user scoring of a finished run through its best checkpoint (`train.recommend.RunRecommender`), for the
benchmarks that look inside a run's metrics: one user per forward pass, as `cammsr recommend` does."""
from __future__ import annotations

import torch

from train.data import Batch
from train.evaluate import last_position
from train.recommend import RunRecommender
from train.step import model_inputs


@torch.no_grad()
def user_vectors_after(recommender: RunRecommender, histories: list[list[int]]) -> torch.Tensor:
    """[users, M, d] (SASRec: [users, d]): each user's vectors after the given history (its last max_seq_len)."""
    device, vectors = recommender.device, []
    for history in histories:
        recent = history[-recommender.max_len:]
        seq = torch.tensor([recent], device=device)
        batch = Batch(seq, torch.tensor([len(recent)], device=device), torch.zeros(1, dtype=torch.long, device=device),
                      torch.ones(1, dtype=torch.bool, device=device))
        seq_emb = recommender.id_rows[seq] * (seq != 0)[..., None]
        with recommender.as_trained():
            output = recommender.model(*model_inputs(batch, seq_emb, recommender.items, recommender.dtype))
        vectors.append(last_position(output, batch.seq_len).user_vectors[0].float())
    return torch.stack(vectors)


def ndcg_at_10_per_user(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores [users, items] (column k = item k + 1), targets [users] item ids -> [users] NDCG@10 (float64);
    rank = 1 + items scoring strictly higher, as in evaluation."""
    ranks = (scores > scores.gather(1, (targets - 1)[:, None])).sum(dim=1) + 1
    gain = 1.0 / torch.log2(ranks.to(torch.float64) + 1)
    return torch.where(ranks <= 10, gain, torch.zeros_like(gain))


def split_histories(sequences: list[list[int]], split: str) -> tuple[list[list[int]], torch.Tensor]:
    """Leave-one-out histories and targets: "valid" predicts the second-to-last item, "test" the last."""
    cut = {"valid": 2, "test": 1}[split]
    return [list(s[:-cut]) for s in sequences], torch.tensor([s[-cut] for s in sequences])
