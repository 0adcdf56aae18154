"""`cammsr train`: the argparse sub-command (wired into launch/cli.py) and a `python -m train.command` entry point.

The same command runs as one process or under torchrun / the deepspeed launcher / accelerate / SLURM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_shards.problems import DataError
from train.config import ConfigError, load_config


def _run_train(args) -> None:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    cfg = load_config(args.config, overrides)  # validated before any work
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass --data DIR (a folder written by `cammsr prepare`)")
    if not Path(cfg.data.path).is_dir():
        raise DataError(f"--data {cfg.data.path}: no such folder")
    from train.loop import run_training  # heavy imports (torchrec, deepspeed) only once the config is valid
    result = run_training(cfg, Path(args.run_dir), resume=args.resume)
    import os
    if os.environ.get("RANK", "0") == "0":
        print(f"metrics: valid {result['valid']}, test {result['test']} -> {Path(args.run_dir) / 'metrics.json'}")


def add_train_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train CAMMSR (or the SASRec baseline) with full-ranking validation and test",
        description="Train on a prepared dataset: TorchRec item-ID table + DeepSpeed dense part, one code path for "
                    "1..N processes (run under torchrun / deepspeed / accelerate / srun for several). Writes "
                    "RUN/config.yaml (resolved), RUN/metrics.json, RUN/tensorboard/ and RUN/checkpoints/. "
                    "Overrides: section.key=value or a unique key=value (e.g. model=sasrec max_epochs=3).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, help="prepared dataset folder (sets data.path)")
    parser.add_argument("--config", type=Path, help="YAML config (configs/NAME.yaml)")
    parser.add_argument("--run-dir", type=Path, required=True, help="output folder of this run")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest checkpoint")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # launchers; env wins
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides (values parsed as YAML), anywhere on the line; a later one wins")
    parser.set_defaults(run=_run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m train.command ...` == `cammsr train ...` (launchers run this module)."""
    from launch.cli import main as cli_main
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(argv if argv[:1] == ["train"] else ["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
