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
from benchmarks.per_user import ndcg_at_10_per_user, split_histories, user_vectors_after
from data_shards.reader import PreparedDataset
from train.recommend import RunRecommender


def subset_scores(run_dir, data_dir) -> dict[str, tuple[float, float]]:
    """{"id + text": (valid NDCG@10, std of the summed scores), ...} for every non-empty subset of the run's
    modalities, in order of size."""
    recommender = RunRecommender(run_dir, data_path=data_dir)
    modalities = recommender.cfg.model.modalities
    if recommender.cfg.model.name != "cammsr":
        raise SystemExit(f"{run_dir} is a {recommender.cfg.model.name} run: one score, nothing to split")
    sequences = [s.items for s in PreparedDataset(data_dir, verify=False).user_sequences()]
    histories, targets = split_histories(sequences, "valid")
    users = user_vectors_after(recommender, histories)
    per_modality = torch.einsum("umd,nmd->mun", users, recommender.candidates[1:])  # [M, users, items]
    results = {}
    for size in range(1, len(modalities) + 1):
        for subset in itertools.combinations(range(len(modalities)), size):
            scores = per_modality[list(subset)].sum(dim=0)
            ndcg = float(ndcg_at_10_per_user(scores, targets.to(scores.device)).mean())
            results[" + ".join(modalities[m] for m in subset)] = (ndcg, float(scores.std()))
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
