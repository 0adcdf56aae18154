"""Seconds of one full validation pass (every user ranked against every item) for a config's model, untrained.

    python -m benchmarks.eval_time --data data/beauty --config configs/beauty.yaml [model.name=sasrec]

Runs the trainer's own evaluation on this machine, so that a change to the evaluation path can be timed before and
after (run it at both commits); prints the validation NDCG@10 too, which a pure speed change must leave as it was.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import describe_machine
from benchmarks.scratch_trainer import add_config_arguments, scratch_trainer
from launch.arguments import parse_with_overrides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    args = parse_with_overrides(parser, argv)
    machine = describe_machine()
    with scratch_trainer(args) as trainer:
        start = time.perf_counter()
        valid = trainer.evaluate_split("valid")
        seconds = time.perf_counter() - start
    print(f"{trainer.cfg.model.name}: one validation of {valid['count']:,} users in {seconds:.1f} s "
          f"(ndcg@10 {valid['ndcg@10']:.6f}); {machine['cpu']}, gpu {machine['gpu']}, "
          f"{torch.get_num_threads()} torch threads, load average {machine['load_average_1m']}, {machine['date']}")

if __name__ == "__main__":
    main()
