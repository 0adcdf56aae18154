"""Tuned models side by side: each study's chosen run read on test at its best validation epoch, the budget each
study spent, each model's per-user test NDCG@10 minus the first model's (paired, bootstrap 95% interval) and a
public anchor's number beside them.

    python -m benchmarks.tuned_accuracy --data data/beauty SASRec=runs/tune_beauty_sasrec \\
        CAMMSR=runs/tune_beauty_cammsr --anchor 0.0531 \\
        --anchor-name "SASRec + sampled softmax, RecTools (blondered/transformer_benchmark)" [--record-prefix ID]

A model tuned in stages names its studies joined by commas (NAME=FIRST,SECOND): its run is the best on validation
over all of them, its budget their sum. Every model must have finished the same number of distinct configurations
(`cammsr tune --trials`): a comparison gives each model the same tuning budget, and the table prints it in trials
and in epochs trained. Test is read here, once, from the run each model's studies chose on validation
(`training_runs.best_trial_results`); the studies never read it. One model alone gives its row against the anchor,
without a paired column.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.machine import describe_machine
from benchmarks.paired_comparison import excludes_history, format_difference, paired_against
from benchmarks.training_runs import best_trial_results
from train.tune import best_trial_run, study_progress


def parse_studies(pairs: list[str]) -> dict[str, list[Path]]:
    studies = {}
    for pair in pairs:
        name, sep, folders = pair.partition("=")
        if not sep or not name or not all(folders.split(",")):
            raise SystemExit(f"{pair!r}: give NAME=STUDY_DIR[,STUDY_DIR...]")
        studies[name] = [Path(folder) for folder in folders.split(",")]
    return studies


def budgets(studies: dict[str, list[Path]]) -> dict[str, dict]:
    """Each model's progress over its studies (`train.tune.study_progress`: configurations and epochs summed, the
    best value and the study holding it); models of unequal budgets are refused by name."""
    progress = {}
    for name, folders in studies.items():
        states = {folder: study_progress(folder) for folder in folders}
        missing = [str(folder) for folder, state in states.items() if state is None or state["best"] is None]
        if missing:
            raise SystemExit(f"no complete trial yet in {name}'s " + ", ".join(missing))
        chosen = max(states, key=lambda folder: states[folder]["best"])
        progress[name] = {"counted": sum(state["counted"] for state in states.values()),
                          "epochs": sum(state["epochs"] for state in states.values()), "chosen": chosen,
                          "stages": len(folders)}
    counted = {name: state["counted"] for name, state in progress.items()}
    if len(set(counted.values())) > 1:
        raise SystemExit("the studies tried different numbers of configurations ("
                         + ", ".join(f"{name} {n}" for name, n in counted.items())
                         + "): continue the smaller ones with the larger --trials first")
    return progress


def table(results: dict, progress: dict, differences: dict, anchor: float | None) -> str:
    reference = next(iter(results))
    lines = [f"| model | budget: configurations / epochs | chosen run (best epoch / run) | valid NDCG@10 | "
             f"test NDCG@10 | test / anchor | minus {reference} (paired 95% interval) |",
             "|---|---|---|---|---|---|---|"]
    for name, (run, metrics) in results.items():
        test = metrics["test"]["ndcg@10"]
        where = run.name if progress[name]["stages"] == 1 else f"{progress[name]['chosen'].name}/{run.name}"
        ratio = f"{test / anchor:.3f}" if anchor else "-"
        versus = format_difference(differences[name]) if name in differences else "-"
        lines.append(f"| {name} | {progress[name]['counted']} / {progress[name]['epochs']} | {where} "
                     f"({metrics['best_epoch']} / {metrics['epochs_run']}) | {metrics['valid']['ndcg@10']:.4f} | "
                     f"{test:.4f} | {ratio} | {versus} |")
    return "\n".join(lines)


def write_records(args, results: dict, progress: dict, differences: dict) -> None:
    from benchmarks.results import write_record
    command = " ".join(["python -m benchmarks.tuned_accuracy", f"--data {args.data}", *args.studies,
                        *([f"--anchor {args.anchor}", f'--anchor-name "{args.anchor_name}"'] if args.anchor else []),
                        f"--record-prefix {args.record_prefix}"])
    folder = Path(args.data).name
    reference = next(iter(results))
    for name, (run, metrics) in results.items():
        details = {"valid NDCG@10": round(metrics["valid"]["ndcg@10"], 4),
                   "test MRR@10": round(metrics["test"]["mrr@10"], 4),
                   "tuning budget": f"{progress[name]['counted']} configurations, {progress[name]['epochs']} epochs",
                   "chosen run": f"{run} (best epoch {metrics['best_epoch']} of {metrics['epochs_run']})"}
        if name in differences:
            details[f"minus {reference}, paired 95% interval"] = format_difference(differences[name])
        write_record(f"{args.record_prefix}_{name.lower().replace(' ', '_')}", area=f"Tuned accuracy: {folder}",
                     claim=f"{name} on {folder}, tuned on validation, test", metric="test NDCG@10",
                     ours=round(metrics["test"]["ndcg@10"], 4),
                     reference={"name": args.anchor_name, "value": args.anchor} if args.anchor else None,
                     details=details, command=command, headline=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tuned_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the prepared dataset every study trained on")
    parser.add_argument("studies", nargs="+", metavar="NAME=STUDY_DIR[,STUDY_DIR...]",
                        help="finished `cammsr tune` studies, several for a model tuned in stages; the first model is "
                             "the reference of the paired column")
    parser.add_argument("--anchor", type=float, help="a public number on the same files and protocol (test NDCG@10)")
    parser.add_argument("--anchor-name", default="anchor", help="where the anchor comes from")
    parser.add_argument("--record-prefix", help="write benchmarks/results/<PREFIX>_<name>.json per model")
    args = parser.parse_args(argv)
    studies = parse_studies(args.studies)
    progress = budgets(studies)
    protocols = {name: excludes_history(best_trial_run(state["chosen"])) for name, state in progress.items()}
    if len(set(protocols.values())) > 1:
        raise SystemExit("the chosen runs rank differently (eval.exclude_history: "
                         + ", ".join(f"{name} {value}" for name, value in protocols.items()) + "): not comparable")
    results = {name: best_trial_results(state["chosen"], args.data) for name, state in progress.items()}
    reference, *others = results
    differences = (paired_against(results[reference][0], {name: results[name][0] for name in others}, args.data)
                   if others else {})
    print(f"\n{args.data}; {describe_machine()}\n")
    print(table(results, progress, differences, args.anchor))
    if args.record_prefix:
        write_records(args, results, progress, differences)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
