"""Accuracy of finished runs next to the paper's rows: one markdown table from the runs' metrics.json.

    python -m benchmarks.accuracy_table --paper beauty \
        "SASRec (ours)=runs/beauty/sasrec" "CAMMSR w/o V (ours)=runs/beauty/cammsr"
    python -m benchmarks.accuracy_table --metrics ndcg@5,ndcg@10,mrr@10,recall@10 --curves \
        "SASRec=runs/ml1m/sasrec" "CAMMSR=runs/ml1m/cammsr"

Each run contributes its TEST metrics at the best VALIDATION epoch (what the trainer stores), the validation value
it was selected on, the best epoch and the epochs run (a run still training is read as it stands, and says so);
`--curves` adds each run's validation NDCG@10 by epoch. Paper rows are Table III of the CAMMSR paper (test, RecBole
protocol: leave-one-out, full ranking) and RecBole's run recorded in STACK.md; they are printed as recorded, never
recomputed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from benchmarks.machine import describe_machine

PAPER_METRICS = ("ndcg@5", "ndcg@10", "mrr@5", "mrr@10")
DEFAULT_METRICS = ",".join(PAPER_METRICS)
# Table III (Beauty columns; CAMMSR used ID + text + image + categories there), and RecBole 1.2.1's SASRec run on
# the same Beauty files on a 2-core CPU of this kind (../shared/docs/STACK.md: 32 epochs, best validation, test).
PAPER = {
    "beauty": {
        "SASRec (paper, Table III)": (0.0325, 0.0412, 0.0250, 0.0286),
        "CAMMSR (paper, Table III)": (0.0429, 0.0517, 0.0374, 0.0404),
        "SASRec (RecBole 1.2.1, same files, 2-core CPU; STACK.md)": (0.0330, 0.0413, 0.0250, 0.0285),
    },
}


def _row(name: str, values, extra: str = "") -> str:
    cells = " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)
    return f"| {name} | {cells} | {extra} |"


def paper_row(name: str, values: tuple, metrics: list[str]) -> str:
    recorded = dict(zip(PAPER_METRICS, values))
    return _row(name, [recorded.get(m, "-") for m in metrics], "as recorded")


def run_row(name: str, run_dir: Path, metrics: dict, metric_names: list[str]) -> str:
    if metrics.get("test") is None:
        raise SystemExit(f"{run_dir}/metrics.json has no test metrics yet (eval.test=end ranks test once, "
                         "when training ends; eval.test=never, never)")
    test, valid = metrics["test"], metrics["valid"]
    cap = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_epochs"]
    if metrics.get("stopped_early"):
        end = "stopped early (patience)"
    elif metrics["epochs_run"] >= cap:
        end = "epoch cap reached"
    else:
        end = f"NOT finished: {metrics['epochs_run']} of up to {cap} epochs when read"
    note = f"valid ndcg@10 {valid['ndcg@10']:.4f}; best epoch {metrics['best_epoch']}; {end}"
    missing = [m for m in metric_names if m not in test]
    if missing:
        raise SystemExit(f"{run_dir}/metrics.json has no test {', '.join(missing)} (it has {', '.join(test)})")
    return _row(name, [test[m] for m in metric_names], note)


def validation_curve(name: str, metrics: dict) -> str:
    return f"- {name}: " + " ".join(f"{record['valid']['ndcg@10']:.4f}" for record in metrics["history"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR (a `cammsr train` run directory, finished or not)")
    parser.add_argument("--paper", choices=sorted(PAPER), help="also print the paper's rows for this dataset")
    parser.add_argument("--metrics", default=DEFAULT_METRICS,
                        help=f"test metrics, comma-separated, in order (default {DEFAULT_METRICS})")
    parser.add_argument("--curves", action="store_true", help="also print each run's validation NDCG@10 by epoch")
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"run {spec!r}: expected NAME=RUN_DIR")
        # read once: a run still training rewrites its metrics.json, and the row and the curve must agree
        runs.append((name, Path(path), json.loads((Path(path) / "metrics.json").read_text())))
    print(f"machine: {describe_machine()}")
    print("| model | " + " | ".join(m.replace("ndcg", "NDCG").replace("mrr", "MRR").replace("recall", "Recall")
                                    for m in metrics) + " | selection |")
    print("|---" * (len(metrics) + 2) + "|")
    for name, values in PAPER.get(args.paper, {}).items():
        print(paper_row(name, values, metrics))
    for name, run_dir, run_metrics in runs:
        print(run_row(name, run_dir, run_metrics, metrics))
    if args.curves:
        print("\nValidation NDCG@10 by epoch (0-based):")
        for name, _, run_metrics in runs:
            print(validation_curve(name, run_metrics))


if __name__ == "__main__":
    main()
