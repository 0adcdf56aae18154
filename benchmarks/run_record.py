"""Record a finished training run's test metric (at its best validation epoch) as a result record.

    python -m benchmarks.run_record RUN_DIR --id beauty_cammsr --area "Accuracy on Amazon Beauty" \\
        --claim "CAMMSR w/o V, all-positions" --command "cammsr train ..." [--reference "paper=0.0517"] [--headline]

The details hold the best validation value, the best epoch, the epochs run, how the run ended and the median
seconds per training epoch; the machine is this one (run it where the run trained).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.results import RESULTS_DIR, write_record


def run_summary(run_dir: Path, metric: str) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("test") is None:
        raise SystemExit(f"{run_dir}/metrics.json has no test metrics: the run has not finished")
    epochs = [r["epoch_seconds"] for r in metrics["history"]]
    return {"test": metrics["test"][metric], "valid": metrics["valid"][metric], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "ended": "early stop" if metrics["stopped_early"] else "epoch cap",
            "s_per_epoch": round(statistics.median(epochs), 2)}


def parse_reference(text: str | None) -> dict | None:
    if not text:
        return None
    name, _, value = text.rpartition("=")
    if not name:
        raise SystemExit(f"--reference {text!r}: expected NAME=VALUE")
    return {"name": name, "value": float(value)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--area", required=True)
    parser.add_argument("--claim", required=True)
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--reference", help="NAME=VALUE: the peer's or the paper's number")
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    summary = run_summary(args.run_dir, args.metric)
    details = {f"valid {args.metric}": round(summary["valid"], 4), "best epoch": summary["best_epoch"],
               "epochs": f"{summary['epochs_run']} ({summary['ended']})", "s/epoch": summary["s_per_epoch"]}
    write_record(args.id, area=args.area, claim=args.claim, metric=f"test {args.metric.upper()}",
                 ours=round(summary["test"], 4), reference=parse_reference(args.reference), headline=args.headline,
                 details=details, command=args.command, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
