"""Seconds of one full validation pass (every user ranked against every item) for a config's model, untrained.

    python -m benchmarks.eval_time --data data/beauty --config configs/beauty.yaml [model.name=sasrec]

Runs the trainer's own evaluation on this machine, so that a change to the evaluation path can be timed before and
after (run it at both commits); prints the validation NDCG@10 too, which a pure speed change must leave as it was.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import describe_machine
from launch.arguments import parse_with_overrides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--config", type=Path, required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (model.name=sasrec...)")
    args = parse_with_overrides(parser, argv)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from train.config import load_config
    from train.loop import Trainer
    cfg = load_config(args.config, [f"data.path={args.data}", "checkpoint.enabled=false", "logging.tensorboard=false",
                                    *args.overrides])
    machine = describe_machine()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        try:
            start = time.perf_counter()
            valid = trainer.evaluate_split("valid")
            seconds = time.perf_counter() - start
        finally:
            trainer.close()
    print(f"{cfg.model.name}: one validation of {valid['count']:,} users in {seconds:.1f} s "
          f"(ndcg@10 {valid['ndcg@10']:.6f}); {machine['cpu']}, gpu {machine['gpu']}, "
          f"{torch.get_num_threads()} torch threads, load average {machine['load_average_1m']}, {machine['date']}")


if __name__ == "__main__":
    main()
