"""The trainer of a config, built in a throw-away run directory (no checkpoints, no TensorBoard): for the tools that
probe one training step or one evaluation of a config's model on this machine."""
from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    parser.add_argument("--config", type=Path, required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (model.name=sasrec...)")


@contextmanager
def scratch_trainer(args: argparse.Namespace) -> Iterator:
    """A Trainer for args.data / args.config / args.overrides, closed on leaving (process group included)."""
    from train.config import load_config
    from train.loop import Trainer
    cfg = load_config(args.config, [f"data.path={args.data}", "checkpoint.enabled=false", "eval.test=never",
                                    "logging.tensorboard=false", *args.overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        try:
            yield trainer
        finally:
            trainer.close()
