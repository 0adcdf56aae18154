"""The CAMMSR paper's analyses as one command each: the category-noise study (Table V), the category settings
(Table VII: multi-label, one path, virtual categories, none), the MSCL modality pairs (Table IV) and the component
ablations (Table III's w/o rows) of a given, e.g. tuned, config.

    python -m benchmarks.paper_studies noise --data data/beauty --config configs/beauty.yaml \\
        --run-dir runs/noise_beauty [--levels 0.1,0.2,0.3] [--record ID] [key=value ...]
    python -m benchmarks.paper_studies categories --data DATA --config CONFIG --run-dir DIR
    python -m benchmarks.paper_studies pairs --data DATA --config CONFIG --run-dir DIR
    python -m benchmarks.paper_studies ablations --data DATA --config runs/tune_beauty_cammsr/best.yaml --run-dir DIR
    python -m benchmarks.paper_studies ablations --data DATA --from-study runs/tune_beauty_cammsr --run-dir DIR

Every setting trains CAMMSR with the same config (as the paper keeps its main experiment's hyper-parameters) and
differs only in what the study varies; each run stops early on validation and reports test at its best validation
epoch. A finished run is reused and an interrupted one resumed, so the command continues where it stopped. The
paper's own rows (Beauty, where it reports them) are printed beside ours as recorded. The ablations also give each
setting's per-user test NDCG@10 minus the full model's, with a bootstrap 95% interval; `--from-study` takes the
config from a finished `cammsr tune` study's best.yaml and the full model is the run that study chose, read on test
from its best checkpoint instead of trained again.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from benchmarks.machine import describe_machine
from benchmarks.paired_comparison import format_difference, paired_against
from benchmarks.training_runs import best_trial_results, train_or_resume

# Table V, Beauty columns (NDCG@10, MRR@10), as printed in the paper.
PAPER_NOISE_BEAUTY = {"CAMMSR": (0.0517, 0.0404), "removal 10%": (0.0505, 0.0391), "removal 20%": (0.0499, 0.0384),
                      "removal 30%": (0.0492, 0.0377), "misleading 10%": (0.0500, 0.0386),
                      "misleading 20%": (0.0480, 0.0368), "misleading 30%": (0.0470, 0.0357),
                      "w/o CG": (0.0476, 0.0362)}


def noise_settings(levels: list[float]) -> dict[str, list[str]]:
    settings = {"CAMMSR": []}
    for kind in ("removal", "misleading"):
        for level in levels:
            settings[f"{kind} {round(level * 100)}%"] = [f"categories.noise={level}", f"categories.noise_type={kind}"]
    settings["w/o CG"] = ["model.use_category_guidance=false"]
    return settings


def category_settings(virtual_counts: list[int]) -> dict[str, list[str]]:
    settings = {"multi-label (every label)": [], "one path per item": ["categories.source=first_path"]}
    for count in virtual_counts:
        settings[f"virtual categories ({count})"] = ["categories.source=virtual",
                                                     f"categories.virtual_count={count}"]
    settings["w/o CG"] = ["model.use_category_guidance=false"]
    return settings


def pair_settings(modalities: list[str]) -> dict[str, list[str]]:
    """Every non-empty subset of the MSCL pairs of the enabled modalities (Table IV)."""
    pairs = list(itertools.combinations(modalities, 2))
    settings = {}
    for size in range(1, len(pairs) + 1):
        for subset in itertools.combinations(pairs, size):
            name = " + ".join(f"{a}-{b}" for a, b in subset)
            settings[name] = ["model.mscl_pairs=[" + ",".join(f"[{a},{b}]" for a, b in subset) + "]"]
    settings["w/o MSCL"] = ["model.mscl_pairs=[]"]
    return settings


MODALITY_LETTERS = {"text": "T", "image": "V"}  # the paper's names: w/o T, w/o V


def ablation_settings(modalities: list[str], mscl_pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The config as it is, then without category guidance, without MSCL, and without each content modality (its
    MSCL pairs leave with it)."""
    settings = {"CAMMSR": [], "w/o CG": ["model.use_category_guidance=false"], "w/o MSCL": ["model.mscl_pairs=[]"]}
    for modality in modalities:
        if modality in MODALITY_LETTERS:
            kept = [m for m in modalities if m != modality]
            pairs = [pair for pair in mscl_pairs if modality not in pair]
            pair_list = ",".join(f"[{a},{b}]" for a, b in pairs)
            settings[f"w/o {MODALITY_LETTERS[modality]}"] = [f"model.modalities=[{','.join(kept)}]",
                                                             f"model.mscl_pairs=[{pair_list}]"]
    return settings


def _model_config(config: str | None, overrides: list[str]):
    from train.config import load_config
    return load_config(config, overrides).model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_studies", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("noise", "categories", "pairs", "ablations"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--config")
    parser.add_argument("--from-study", type=Path, help="ablations of a finished study's chosen config and run")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--levels", default="0.1,0.2,0.3", help="noise: fractions of labelled items corrupted")
    parser.add_argument("--virtual", default="10,20", help="categories: numbers of virtual categories")
    parser.add_argument("--record", help="write benchmarks/results/<ID>.json (the study's table in its details)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # the study name, then options, then key=value overrides
    if args.from_study is not None:
        if args.study != "ablations" or args.config or args.overrides:
            raise SystemExit("--from-study: ablations only, with the study's own best.yaml (no --config, no "
                             "key=value: the full model is the study's run as it was trained)")
        args.config = str(args.from_study / "best.yaml")
    if args.study == "noise":
        settings = noise_settings([float(v) for v in args.levels.split(",")])
    elif args.study == "categories":
        settings = category_settings([int(v) for v in args.virtual.split(",")])
    elif args.study == "pairs":
        settings = pair_settings(list(_model_config(args.config, args.overrides).modalities))
    else:
        model = _model_config(args.config, args.overrides)
        settings = ablation_settings(list(model.modalities), list(model.mscl_pairs))
    results, folders = {}, {}
    for name, extra in settings.items():
        if args.from_study is not None and not extra:  # the full model: the run the study chose
            folders[name], results[name] = best_trial_results(args.from_study, args.data)
            continue
        folders[name] = args.run_dir / name.replace(" ", "_").replace("/", "").replace("%", "pct").replace("+", "")
        results[name] = train_or_resume(args.data, args.config, folders[name], [*args.overrides, *extra])
    differences = {}
    if args.study == "ablations":  # each setting paired per user with the first, the config as it is
        (_, full), *others = folders.items()
        differences = paired_against(full, dict(others), args.data)
    table = study_table(results, PAPER_NOISE_BEAUTY if args.study == "noise" else {}, differences)
    print(f"\n{args.study} study, {args.data}; {describe_machine()}\n")
    print(table)
    if args.record:
        _record(args, results, differences)
    return 0


def study_table(results: dict[str, dict], paper: dict[str, tuple], differences: dict[str, dict] | None = None) -> str:
    """Markdown: test NDCG@10 / MRR@10 at the best validation epoch, the validation value, the change from the
    first setting (the reference; with `differences`, also its paired 95% interval), epochs, and the paper's Beauty
    row where it has one."""
    reference = next(iter(results.values()))["test"]["ndcg@10"]
    paired = ["minus the first (paired 95% interval)"] if differences else []
    header = ["setting", "test NDCG@10", "test MRR@10", "change", *paired, "valid NDCG@10", "best epoch / run",
              "paper Beauty NDCG@10 / MRR@10"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in results.items():
        test, valid = metrics["test"], metrics["valid"]
        change = (test["ndcg@10"] - reference) / reference * 100
        recorded = paper.get(name)
        paper_cell = f"{recorded[0]:.4f} / {recorded[1]:.4f}" if recorded else "-"
        interval = [format_difference(differences[name]) if name in differences else "-"] if differences else []
        lines.append("| " + " | ".join([name, f"{test['ndcg@10']:.4f}", f"{test['mrr@10']:.4f}", f"{change:+.1f}%",
                                        *interval, f"{valid['ndcg@10']:.4f}",
                                        f"{metrics['best_epoch']} / {metrics['epochs_run']}", paper_cell]) + " |")
    return "\n".join(lines)



def _record(args, results: dict[str, dict], differences: dict[str, dict]) -> None:
    from benchmarks.results import write_record
    first, last = next(iter(results)), list(results)[-1]
    command = " ".join(["python -m benchmarks.paper_studies", args.study, f"--data {args.data}",
                        *([f"--from-study {args.from_study}"] if args.from_study else
                          [f"--config {args.config}"] if args.config else []), f"--run-dir {args.run_dir}",
                        f"--record {args.record}", *args.overrides])
    write_record(args.record, area="Paper analyses",
                 claim=f"CAMMSR {args.study} study, {Path(args.data).name}: {first} vs {last}, test",
                 metric="test NDCG@10", ours=round(results[first]["test"]["ndcg@10"], 4),
                 reference={"name": last, "value": round(results[last]["test"]["ndcg@10"], 4)},
                 details={name: round(m["test"]["ndcg@10"], 4) if name not in differences
                          else f"{m['test']['ndcg@10']:.4f}, paired {format_difference(differences[name])}"
                          for name, m in results.items()}, command=command)


if __name__ == "__main__":
    raise SystemExit(main())
