"""The seed papers' models side by side on one dataset: SASRec, HM4SR, FindRec, TAME and CAMMSR on the same shards,
protocol (leave-one-out, full ranking over every item), evaluator and trainer, each tuned on validation with the
same budget, then read on test at the best validation epoch of the run the study chose.

    python -m benchmarks.model_comparison --data data/quickstart --config configs/quickstart.yaml \\
        --spaces configs/spaces/compare --trials 4 --run-dir runs/compare_quickstart [--record-prefix ID] \\
        [--ledgers DIR] [--parallel P] [--models sasrec,hm4sr,findrec,tame,cammsr] [--timing-epochs 3] [--status] \\
        [key=value ...]

Per model M: `cammsr tune --space SPACES/M.yaml --trials T` (validation only, Optuna, resumable; every space of a
directory has the same shared parameters, epochs cap, patience and pruner, and adds only the model's own keys), then
the study's best trial is ranked on test from its best checkpoint (`training_runs.best_trial_results`: no second
training of the chosen config). Once every study has finished, each chosen config trains --timing-epochs epochs
again, one model after the other, every modality from the first epoch (no ID warm-up): the table's epoch times.
Before them the command waits until other processes use under 10% of the machine's CPU (--idle-wait-minutes, then it
stops without timing; 0 skips the check), so that a study still running beside it cannot slow the numbers. The table
gives test metrics, the validation value they were chosen on, the median epoch of the timing run in seconds, and each
model's test NDCG@10 minus CAMMSR's per user (paired, with a bootstrap 95% interval), beside each paper's own number
on that dataset with its protocol. A model whose config the data cannot run (FindRec without images) is not trained;
its row says why. Everything continues where it stopped: finished studies and runs are reused (with --ledgers,
studies go on from the ledgers on a machine that lacks --run-dir). --status prints how far each model has got
(trials, best validation so far, the chosen run, the timing run) and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import describe_machine, wait_until_idle
from benchmarks.paired_comparison import format_difference, paired_against
from benchmarks.training_runs import best_trial_results, finished_metrics, train_or_resume

MODELS = ("sasrec", "hm4sr", "findrec", "tame", "cammsr")
IDLE_SHARE = 0.1  # other processes' share of the CPU under which an epoch time is taken
NAMES = {"sasrec": "SASRec", "hm4sr": "HM4SR", "findrec": "FindRec", "tame": "TAME", "cammsr": "CAMMSR"}
# Each paper's own NDCG@10 per dataset (the manifest's name), with its protocol, printed as recorded (never
# recomputed). None of the four papers reports MovieLens-1M (FindRec reports MovieLens-100K).
PAPER_NUMBERS = {
    "Beauty": {
        "sasrec": "0.0412 (CAMMSR paper's SASRec row; RecBole prefix protocol, full ranking)",
        "hm4sr": "0.0493 (HM4SR paper, Table 1; RecBole, leave-one-out, full ranking, ID + text + image + time)",
        "findrec": "0.1027 (FindRec paper, Table 2; its own Beauty subset of 4,323 users / 2,424 items, "
                   "leave-one-out)",
        "tame": "0.0502 (TAME paper, Table II; leave-one-out, full ranking, BERT tokens + CLIP patches)",
        "cammsr": "0.0517 (CAMMSR paper, Table III; RecBole prefix protocol, full ranking, ID + text + image)",
    },
}


def paper_number(model: str, dataset: str) -> str | None:
    return PAPER_NUMBERS.get(dataset, {}).get(model)


def base_config(args, folder: Path) -> Path:
    """--config with the command's overrides, as one file (folder/base.yaml) every study and timing run starts from."""
    from train.config import load_config
    path = folder / "base.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(load_config(args.config, args.overrides).to_yaml())
    return path


def refusal(model: str, base: Path) -> str | None:
    """Why the model cannot run on the base config (its validation's message), or None."""
    from train.config import ConfigError, load_config
    try:
        load_config(base, [f"model.name={model}"])
    except ConfigError as error:
        return str(error)
    return None


def tune(model: str, args, base: Path, study_dir: Path) -> Path:
    """Run (or continue) the model's study; its best config file."""
    command = [sys.executable, "-m", "launch.cli", "tune", "--data", args.data, "--config", str(base), "--space",
               str(args.spaces / f"{model}.yaml"), "--study-dir", str(study_dir), "--trials", str(args.trials),
               "--parallel", str(args.parallel),
               *(["--ledger", str(args.ledgers / f"{model}.json")] if args.ledgers else [])]
    print("tuning: " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"the {model} study failed (its output is above)")
    return study_dir / "best.yaml"


def seconds_per_epoch(metrics: dict) -> float:
    """The median training epoch of the run."""
    epochs = [entry["epoch_seconds"] for entry in metrics["history"]]
    return statistics.median(epochs) if epochs else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_comparison", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config")
    parser.add_argument("--spaces", type=Path, required=True, help="a folder with one search space per model")
    parser.add_argument("--trials", type=int, default=4,
                        help="distinct configurations tried per model (the same for each)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--record-prefix", help="write benchmarks/results/<PREFIX>_<model>.json per model")
    parser.add_argument("--ledgers", type=Path,
                        help="a folder for each study's ledger (LEDGERS/<model>.json, `cammsr tune --ledger`): "
                             "studies go on from them on a machine without --run-dir")
    parser.add_argument("--parallel", type=int, default=1,
                        help="trials of one study training at once (`cammsr tune --parallel`), cores shared among them")
    parser.add_argument("--timing-epochs", type=int, default=3,
                        help="epochs each chosen config trains again once every study has finished: the table's "
                             "epoch time")
    parser.add_argument("--status", action="store_true", help="print each model's progress, run nothing")
    parser.add_argument("--idle-wait-minutes", type=float, default=720,
                        help="how long to wait for an idle machine before the timing runs (0: do not check)")
    parser.add_argument("overrides", nargs="*", help="key=value for every study and timing run (e.g. epochs cap)")
    args = parser.parse_args(argv)
    if args.timing_epochs < 1:
        raise SystemExit(f"--timing-epochs {args.timing_epochs}: at least one epoch is timed")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known {list(MODELS)}")
    if args.status:  # the run folder is only read: the base config goes to a scratch folder
        with tempfile.TemporaryDirectory() as scratch:
            print(progress_table(models, args, base_config(args, Path(scratch))))
        return 0
    base = base_config(args, args.run_dir)
    results, refused, chosen = {}, {}, {}
    for model in models:
        why = refusal(model, base)
        if why:
            refused[model] = why
            print(f"{NAMES[model]}: not run: {why}", flush=True)
            continue
        chosen[model] = tune(model, args, base, args.run_dir / model / "study")
        results[model] = best_trial_results(args.run_dir / model / "study", args.data)
    if args.idle_wait_minutes > 0 and any(finished_metrics(args.run_dir / m / "timing") is None for m in results):
        share = wait_until_idle(args.idle_wait_minutes, IDLE_SHARE)
        if share >= IDLE_SHARE:
            raise SystemExit(f"other processes still use {share:.0%} of the CPU after {args.idle_wait_minutes:g} min: "
                             "no timing taken; run the command again when the machine is idle (it continues here)")
    seconds = {model: seconds_per_epoch(train_or_resume(args.data, str(chosen[model]), args.run_dir / model / "timing",
                                                        [f"train.max_epochs={args.timing_epochs}",
                                                         "train.id_warmup_epochs=0"]))
               for model in results}
    differences = {}
    if "cammsr" in results:
        differences = paired_against(results["cammsr"][0], {model: run for model, (run, _) in results.items()
                                                           if model != "cammsr"}, args.data)
    print(f"\n{args.data}, {args.trials} tuning trials per model; {describe_machine()}\n")
    dataset = dataset_name(args.data)
    print(comparison_table(results, differences, refused, seconds, dataset))
    if args.record_prefix:
        _records(args, results, differences, seconds, dataset)
    return 0


def dataset_name(data: str) -> str:
    from data_shards.reader import PreparedDataset
    return PreparedDataset(data, verify=False).manifest.get("name") or Path(data).name


def progress_table(models: list[str], args, base: Path) -> str:
    """Where each model's study, chosen run and timing run stand (read from their folders)."""
    from train.tune import best_trial_run, study_progress
    lines = ["| model | tuning trials finished | best valid NDCG@10 so far | chosen run (best trial) | timing run |",
             "|---|---|---|---|---|"]
    for model in models:
        why = refusal(model, base)
        if why:
            lines.append(f"| {NAMES[model]} | not run: {why} | | | |")
            continue
        study = study_progress(args.run_dir / model / "study")
        trials = "not started" if study is None else f"{study['counted']} of {args.trials}"
        best = "-" if study is None or study["best"] is None else f"{study['best']:.4f}"
        chosen = best_trial_run(args.run_dir / model / "study")
        lines.append(f"| {NAMES[model]} | {trials} | {best} | {'-' if chosen is None else _chosen_run(chosen)} | "
                     f"{run_state(args.run_dir / model / 'timing', _timing_finished)} |")
    return "\n".join(lines)


def run_state(run: Path, finished) -> str:
    """Where a run stands, from its metrics.json: not started, its epochs so far, or `finished(metrics)`."""
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        return "not started"
    metrics = json.loads(metrics_file.read_text())
    if metrics.get("test") is not None:
        return finished(metrics)
    valid = metrics.get("valid") or {}
    best = f", best valid {valid['ndcg@10']:.4f} at epoch {metrics['best_epoch']}" if "ndcg@10" in valid else ""
    return f"{metrics['epochs_run']} epochs{best}"


def _chosen_run(run: Path) -> str:
    metrics = json.loads((run / "metrics.json").read_text())
    return f"{run.name}: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}"


def _timing_finished(metrics: dict) -> str:
    return f"finished: {seconds_per_epoch(metrics):.1f} s/epoch"


def comparison_table(results: dict, differences: dict, refused: dict, seconds: dict, dataset: str) -> str:
    lines = ["| model | test NDCG@10 | test NDCG@5 | test MRR@10 | valid NDCG@10 | minus CAMMSR (paired 95% interval) "
             f"| s/epoch | best epoch / run | paper's {dataset} NDCG@10 (its protocol) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, (_, metrics) in results.items():
        test = metrics["test"]
        versus = format_difference(differences[model]) if model in differences else "-"
        lines.append(f"| {NAMES[model]} | {test['ndcg@10']:.4f} | {test['ndcg@5']:.4f} | {test['mrr@10']:.4f} | "
                     f"{metrics['valid']['ndcg@10']:.4f} | {versus} | {seconds[model]:.1f} | "
                     f"{metrics['best_epoch']} / {metrics['epochs_run']} | {paper_number(model, dataset) or 'none'} |")
    for model, why in refused.items():
        lines.append(f"| {NAMES[model]} | not run: {why} | | | | | | | {paper_number(model, dataset) or 'none'} |")
    return "\n".join(lines)


def _records(args, results: dict, differences: dict, seconds: dict, dataset: str) -> None:
    from benchmarks.results import write_record
    command = " ".join(["python -m benchmarks.model_comparison", f"--data {args.data}",
                        *([f"--config {args.config}"] if args.config else []), f"--spaces {args.spaces}",
                        f"--trials {args.trials}", f"--parallel {args.parallel}", f"--models {args.models}",
                        f"--run-dir {args.run_dir}",
                        f"--timing-epochs {args.timing_epochs}", f"--record-prefix {args.record_prefix}",
                        *args.overrides])
    folder = Path(args.data).name
    for model, (_, metrics) in results.items():
        details = {"valid NDCG@10": round(metrics["valid"]["ndcg@10"], 4),
                   "test MRR@10": round(metrics["test"]["mrr@10"], 4),
                   "seconds per epoch": round(seconds[model], 1),
                   "best epoch": metrics["best_epoch"], "tuning trials": args.trials}
        if paper_number(model, dataset):
            details["the paper's own number (its protocol)"] = paper_number(model, dataset)
        reference = None
        if model in differences:
            details["minus CAMMSR, paired 95% interval"] = format_difference(differences[model])
            reference = {"name": "CAMMSR, same comparison", "value": round(results["cammsr"][1]["test"]["ndcg@10"], 4)}
        write_record(f"{args.record_prefix}_{model}", area=f"Model comparison: {folder}",
                     claim=f"{NAMES[model]} on {folder}, tuned on validation, test", metric="test NDCG@10",
                     ours=round(metrics["test"]["ndcg@10"], 4), reference=reference, details=details,
                     command=command)


if __name__ == "__main__":
    raise SystemExit(main())
