"""Does a stronger text encoder help? The same config trained on the default text features (all-MiniLM-L6-v2) and on
another encoder's (all-mpnet-base-v2, once `cammsr install-encoder all-mpnet-base-v2` has run), then the per-user
paired difference of NDCG@10 (other minus default) on validation, which decides, and once on test.

    python -m benchmarks.text_encoder_accuracy --data data/beauty --config configs/beauty.yaml \\
        --encoder all-mpnet-base-v2 --run-dir runs/text_encoder_beauty [--record ID] [key=value ...]

A dataset folder holds one text store, so the other encoder's features go to RUN_DIR/data_<name>: the dataset's
manifest and shards linked, its own features/ (built by the first training). Finished runs are reused and an
interrupted one resumed, so the command continues where it stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.paired_comparison import format_difference, paired_difference, per_user_ndcg
from benchmarks.training_runs import train_or_resume

SHARED = ("manifest.json", "items", "users")


def dataset_view(data: Path, folder: Path) -> Path:
    """`folder` with `data`'s manifest and shards linked and a features/ of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = folder / name
        if link.is_symlink():  # a view made from another path to the dataset (or a moved one) is relinked
            link.unlink()
        link.symlink_to((data / name).resolve())
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text_encoder_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--config")
    parser.add_argument("--encoder", required=True, help="data.text_encoder of the challenger")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--record", help="write benchmarks/results/<ID>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    label = Path(args.encoder).name  # a name, or a local folder's name
    other_data = dataset_view(args.data, args.run_dir / f"data_{label}")
    runs = {"default": (args.data, args.run_dir / "default", []),
            args.encoder: (other_data, args.run_dir / label, [f"data.text_encoder={args.encoder}"])}
    metrics = {name: train_or_resume(str(data), args.config, run, [*args.overrides, *extra])
               for name, (data, run, extra) in runs.items()}
    comparison = {}
    for split in ("valid", "test"):
        ours, base = (per_user_ndcg(runs[name][1], runs[name][0], split) for name in (args.encoder, "default"))
        comparison[split] = paired_difference(ours, base)
        low, high = comparison[split]["ci95"]
        print(f"{split}: {args.encoder} - default = {comparison[split]['mean']:+.4f} "
              f"(SE {comparison[split]['se']:.4f}, bootstrap 95% [{low:+.4f}, {high:+.4f}])")
    helps = comparison["valid"]["ci95"][0] > 0
    print(f"validation {'favours' if helps else 'does not favour'} {args.encoder} (paired interval "
          f"{'above' if helps else 'not above'} zero); test NDCG@10 {args.encoder} "
          f"{metrics[args.encoder]['test']['ndcg@10']:.4f}, default {metrics['default']['test']['ndcg@10']:.4f}")
    if args.record:
        _record(args, metrics, comparison)
    return 0


def _record(args, metrics: dict, comparison: dict) -> None:
    from benchmarks.results import write_record
    command = " ".join(["python -m benchmarks.text_encoder_accuracy", f"--data {args.data}",
                        *([f"--config {args.config}"] if args.config else []), f"--encoder {args.encoder}",
                        f"--run-dir {args.run_dir}", f"--record {args.record}", *args.overrides])
    details = {}
    for split in ("valid", "test"):
        details[f"{split}: {args.encoder} minus default, paired 95% interval"] = format_difference(comparison[split])
    details["valid NDCG@10"] = (f"{metrics[args.encoder]['valid']['ndcg@10']:.4f} vs "
                                f"{metrics['default']['valid']['ndcg@10']:.4f}")
    details["best epoch"] = f"{metrics[args.encoder]['best_epoch']} vs {metrics['default']['best_epoch']}"
    write_record(args.record, area="Text encoders", claim=f"CAMMSR with {args.encoder} text features vs the default "
                 f"all-MiniLM-L6-v2, {Path(args.data).name}, test", metric="test NDCG@10",
                 ours=round(metrics[args.encoder]["test"]["ndcg@10"], 4),
                 reference={"name": "all-MiniLM-L6-v2, same config",
                            "value": round(metrics["default"]["test"]["ndcg@10"], 4)},
                 details=details, command=command)


if __name__ == "__main__":
    raise SystemExit(main())
