"""Does training the encoders beat frozen features? CAMMSR trained with frozen features and with a `features.tune`
mode at each candidate encoder learning rate, the mode's learning rate chosen on validation, then the per-user paired
difference of NDCG@10 (chosen minus frozen) on validation and, once, on test.

    python -m benchmarks.encoder_tuning_accuracy --data data/quickstart --config configs/quickstart.yaml \\
        --mode side_adapter --lrs 0.001,0.0001 --run-dir runs/tune_accuracy [--record ID] [key=value ...]

Every run trains with model.loss_type=sampled_softmax (what trained encoders need; the frozen run too, so the two
differ only in the encoders) and stops early on validation. A finished run (metrics.json with test) is reused and an
interrupted one resumed, so the command continues where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.paired_comparison import paired_difference, per_user_ndcg
from benchmarks.training_runs import train_or_resume


def train(data: str, config: str | None, run_dir: Path, overrides: list[str]) -> dict:
    return train_or_resume(data, config, run_dir, ["model.loss_type=sampled_softmax", *overrides])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_tuning_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config")
    parser.add_argument("--mode", required=True, choices=("top_layers", "lora", "side_adapter"))
    parser.add_argument("--lrs", default="0.001,0.0001", help="candidate features.lr values, chosen on validation")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tune_accuracy"))
    parser.add_argument("--record", help="write benchmarks/results/<ID>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    frozen_dir = args.run_dir / "frozen"
    frozen = train(args.data, args.config, frozen_dir, args.overrides)
    tuned = {}
    for lr in args.lrs.split(","):
        run = args.run_dir / f"{args.mode}_lr{lr}"
        tuned[run] = train(args.data, args.config, run, [*args.overrides, f"features.tune={args.mode}",
                                                         f"features.lr={lr}"])
    chosen = max(tuned, key=lambda run: tuned[run]["valid"]["ndcg@10"])
    print(f"\nvalidation NDCG@10: frozen {frozen['valid']['ndcg@10']:.4f}; " + "; ".join(
        f"{run.name} {m['valid']['ndcg@10']:.4f}" for run, m in tuned.items()) + f" -> {chosen.name}")
    comparison = {}
    for split in ("valid", "test"):
        comparison[split] = paired_difference(per_user_ndcg(chosen, args.data, split),
                                              per_user_ndcg(frozen_dir, args.data, split))
        low, high = comparison[split]["ci95"]
        print(f"{split}: {chosen.name} - frozen = {comparison[split]['mean']:+.4f} (SE {comparison[split]['se']:.4f}, "
              f"bootstrap 95% [{low:+.4f}, {high:+.4f}])")
    print(f"test NDCG@10: {chosen.name} {tuned[chosen]['test']['ndcg@10']:.4f}, frozen {frozen['test']['ndcg@10']:.4f}")
    if args.record:
        from benchmarks.results import write_record
        low, high = comparison["test"]["ci95"]
        command = "python -m benchmarks.encoder_tuning_accuracy " + " ".join(
            [f"--data {args.data}"] + ([f"--config {args.config}"] if args.config else [])
            + [f"--mode {args.mode}", f"--lrs {args.lrs}", f"--record {args.record}", *args.overrides])
        write_record(args.record, area="Trainable encoders", claim=f"CAMMSR, encoders {args.mode.replace('_', ' ')} "
                     f"vs frozen, {Path(args.data).name}, test", metric="test NDCG@10",
                     ours=round(tuned[chosen]["test"]["ndcg@10"], 4),
                     reference={"name": "frozen encoders, same run", "value": round(frozen["test"]["ndcg@10"], 4)},
                     details={"paired difference": round(comparison["test"]["mean"], 4),
                              "95% interval": f"[{low:+.4f}, {high:+.4f}]",
                              "valid": f"{tuned[chosen]['valid']['ndcg@10']:.4f} vs {frozen['valid']['ndcg@10']:.4f}",
                              "chosen features.lr": chosen.name.rsplit("_lr", 1)[1],
                              "users": tuned[chosen]["test"]["count"]},
                     command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
