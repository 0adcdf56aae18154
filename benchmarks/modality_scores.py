"""How much each modality's score (Eq. 15 sums one dot product per modality) contributes in a finished CAMMSR run:
validation NDCG@10 when the run's best checkpoint ranks with every subset of its modalities' scores.

    python -m benchmarks.modality_scores --data RUN/data RUN/cammsr

A pathway that ranks far worse alone than the same pathway trained alone (a one-modality run) has co-adapted with
the others. Validation only: every user's history is the training part, the target the validation item.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.machine import describe_machine
from cammsr.metrics import ranking_metric_sums, sums_to_means
from data_shards.reader import PreparedDataset
from train.data import Batch
from train.evaluate import last_position
from train.recommend import RunRecommender
from train.step import model_inputs


@torch.no_grad()
def validation_user_vectors(recommender: RunRecommender, histories: list[list[int]]) -> torch.Tensor:
    """[users, M, d]: each user's per-modality vectors after their training history (one user per pass)."""
    vectors = []
    for history in histories:
        recent = history[-recommender.max_len:]
        seq = torch.tensor([recent], device=recommender.device)
        batch = Batch(seq, torch.tensor([len(recent)], device=recommender.device),
                      torch.zeros(1, dtype=torch.long, device=recommender.device),
                      torch.ones(1, dtype=torch.bool, device=recommender.device))
        seq_emb = recommender.id_rows[seq] * (seq != 0)[..., None]
        with recommender.as_trained():
            output = recommender.model(*model_inputs(batch, seq_emb, recommender.items, recommender.dtype))
        vectors.append(last_position(output, batch.seq_len).user_vectors[0].float())
    return torch.stack(vectors)


def ndcg_at_10(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """scores [users, items] (column k = item k + 1), targets [users] item ids; ties as in evaluation."""
    target_scores = scores.gather(1, (targets - 1)[:, None])
    ranks = (scores > target_scores).sum(dim=1) + 1
    return sums_to_means(ranking_metric_sums(ranks))["ndcg@10"]


def subset_scores(run_dir, data_dir) -> dict[str, tuple[float, float]]:
    """{"id + text": (valid NDCG@10, std of the summed scores), ...} for every non-empty subset of the run's
    modalities, in order of size."""
    recommender = RunRecommender(run_dir, data_path=data_dir)
    modalities = recommender.cfg.model.modalities
    if recommender.cfg.model.name != "cammsr":
        raise SystemExit(f"{run_dir} is a {recommender.cfg.model.name} run: one score, nothing to split")
    sequences = [s.items for s in PreparedDataset(data_dir, verify=False).user_sequences()]
    users = validation_user_vectors(recommender, [list(s[:-2]) for s in sequences])
    targets = torch.tensor([s[-2] for s in sequences], device=users.device)
    per_modality = torch.einsum("umd,nmd->mun", users, recommender.candidates[1:])  # [M, users, items]
    results = {}
    for size in range(1, len(modalities) + 1):
        for subset in itertools.combinations(range(len(modalities)), size):
            scores = per_modality[list(subset)].sum(dim=0)
            results[" + ".join(modalities[m] for m in subset)] = (ndcg_at_10(scores, targets), float(scores.std()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the prepared dataset the run trained on")
    parser.add_argument("run", help="a finished CAMMSR run directory")
    args = parser.parse_args()
    results = subset_scores(args.run, args.data)
    print(f"Validation NDCG@10 of {args.run} ranking with a subset of its modality scores; {describe_machine()}")
    print("| scores summed | valid NDCG@10 | std of the scores |")
    print("|---|---|---|")
    for names, (ndcg, spread) in results.items():
        print(f"| {names} | {ndcg:.4f} | {spread:.3f} |")


if __name__ == "__main__":
    main()
