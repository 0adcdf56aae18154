"""One training run of a benchmark that continues where it stopped: a finished run (metrics.json with test metrics)
is reused when it was trained from the config asked for, an interrupted one resumed from its latest checkpoint, a
new one started (`cammsr train` as a subprocess, its output shown). And the test of a study's chosen run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from train.checkpoint import config_changes
from train.config import load_config
from train.tune import best_trial_run


def finished_metrics(run_dir: Path) -> dict | None:
    """The run's metrics.json when the run has finished (its test is in), else None."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return None
    finished = json.loads(metrics.read_text())
    return finished if finished.get("test") is not None else None


def train_or_resume(data: str, config: str | None, run_dir: Path, overrides: list[str]) -> dict:
    """The run's metrics.json once it has finished."""
    metrics = run_dir / "metrics.json"
    finished = finished_metrics(run_dir)
    if finished is not None:
        _refuse_another_config(run_dir, finished, data, config, overrides)
        print(f"{run_dir}: finished, reused", flush=True)
        return finished
    resume = (run_dir / "checkpoints" / "latest").is_file()
    command = [sys.executable, "-m", "train.command", "--data", data, "--run-dir", str(run_dir),
               *(["--config", config] if config else []), *(["--resume"] if resume else []), *overrides]
    print(("resuming: " if resume else "training: ") + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"training {run_dir} failed (its output is above)")
    return json.loads(metrics.read_text())


def _refuse_another_config(run_dir: Path, finished: dict, data: str, config: str | None, overrides: list[str]) -> None:
    """A finished run trained from another config (say, a study whose best trial changed since) is not reused."""
    wanted = load_config(config, [f"data.path={data}", *overrides])
    if finished.get("config_fingerprint") == wanted.fingerprint():
        return
    saved, asked = yaml.safe_load((run_dir / "config.yaml").read_text()), wanted.to_dict()
    if asked["model"]["category_levels"] is None:  # the trainer reads it from the dataset and writes it down
        asked["model"]["category_levels"] = saved["model"].get("category_levels")
    changed = config_changes(saved, asked)
    if changed:
        raise SystemExit(f"{run_dir} finished with another config than {config or 'the defaults'} (changed keys: "
                         + "; ".join(changed[:10]) + "): move it aside to train this one")


def best_trial_results(study_dir: Path, data: str) -> tuple[Path, dict]:
    """(run directory, metrics.json) of the study's best trial, with "test" ranked from the trial's best checkpoint
    by the run's own evaluation: the chosen config's test at its best validation round, from the very run the
    study chose on validation (training its config again gives the same curve on one CPU process and costs a
    whole run; a study taken from a ledger has done so once, `cammsr tune --ledger`). Nothing is written to the
    trial's folder."""
    from train.recommend import RunRecommender
    run = best_trial_run(study_dir)
    if run is None:
        raise SystemExit(f"{study_dir}: no complete trial to read test from")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"] = RunRecommender(run, data_path=data).evaluate("test")
    return run, metrics
