"""Is run A's NDCG@10 really above run B's? The per-user difference on the same users (same data, same split):
its mean, paired standard error and a bootstrap 95% interval.

    python -m benchmarks.paired_comparison --data RUN/data --split test RUN/cammsr RUN/sasrec

Both runs' best checkpoints rank every user's target against all items (one user per pass, as `cammsr recommend`),
or against the items the user has not seen when the runs evaluate so (eval.exclude_history; two runs that rank
differently are not compared), so each mean equals the run's own metric up to float rounding. Use it to report a
finished comparison; choose settings on --split valid only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import describe_machine
from benchmarks.per_user import ndcg_at_10_per_user, split_histories, user_vectors_after
from data_shards.reader import PreparedDataset
from train.config import load_config
from train.recommend import RunRecommender


def per_user_ndcg(run_dir, data_dir, split: str) -> np.ndarray:
    """Each user's NDCG@10 on `split`, ranked as the run's own evaluation ranks (eval.exclude_history: the items
    before the target score -inf, as train/evaluate.py masks them)."""
    recommender = RunRecommender(run_dir, data_path=data_dir)
    users_data = list(PreparedDataset(data_dir, verify=False).user_sequences())
    histories, targets = split_histories([s.items for s in users_data], split)
    times, _ = split_histories([s.timestamps.tolist() for s in users_data], split)
    users = user_vectors_after(recommender, histories, times).flatten(1)
    scores = users @ recommender.candidates[1:].flatten(1).T
    if recommender.cfg.eval.exclude_history:
        rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor([len(h) for h in histories]))
        columns = torch.tensor([item - 1 for history in histories for item in history], dtype=torch.long)
        scores[rows.to(scores.device), columns.to(scores.device)] = float("-inf")
    return ndcg_at_10_per_user(scores, targets.to(scores.device)).cpu().numpy()


def excludes_history(run_dir) -> bool:
    """Whether the run ranks a target among the items its user has not seen (its eval.exclude_history)."""
    return load_config(Path(run_dir) / "config.yaml", world_size=1).eval.exclude_history


def paired_against(reference, runs: dict, data_dir, split: str = "test") -> dict[str, dict]:
    """Each named run's per-user NDCG@10 on `split` minus the reference run's (`paired_difference`)."""
    anchor = per_user_ndcg(reference, data_dir, split)
    return {name: paired_difference(per_user_ndcg(run, data_dir, split), anchor) for name, run in runs.items()}


def format_difference(difference: dict) -> str:
    """"+0.0143 [+0.0072, +0.0216]": a paired difference's mean and 95% interval, as tables and records print it."""
    low, high = difference["ci95"]
    return f"{difference['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean of a - b, its standard error, a percentile-bootstrap 95% interval and the share of resamples <= 0."""
    difference = a - b
    rng = np.random.default_rng(seed)
    means = np.array([difference[rng.integers(0, len(difference), len(difference))].mean()
                      for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(difference.mean()), "se": float(difference.std(ddof=1) / np.sqrt(len(difference))),
            "ci95": (float(low), float(high)), "share_not_above": float((means <= 0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the prepared dataset both runs trained on")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    args = parser.parse_args()
    protocols = {run: excludes_history(run) for run in (args.run_a, args.run_b)}
    if len(set(protocols.values())) > 1:
        raise SystemExit("the runs rank differently (eval.exclude_history: " +
                         ", ".join(f"{run} {value}" for run, value in protocols.items()) + "): not comparable")
    a, b = (per_user_ndcg(run, args.data, args.split) for run in (args.run_a, args.run_b))
    result = paired_difference(a, b)
    print(f"{args.split} NDCG@10 over {len(a)} users; {describe_machine()}")
    print(f"| run | {args.split} NDCG@10 |\n|---|---|")
    print(f"| {args.run_a} | {a.mean():.4f} |\n| {args.run_b} | {b.mean():.4f} |")
    low, high = result["ci95"]
    print(f"A - B: {result['mean']:+.4f} (paired SE {result['se']:.4f}; bootstrap 95% interval [{low:+.4f}, "
          f"{high:+.4f}]; share of resamples with A - B <= 0: {result['share_not_above']:.3f})")


if __name__ == "__main__":
    main()
