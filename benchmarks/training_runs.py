"""One training run of a benchmark that continues where it stopped: a finished run (metrics.json with test metrics)
is reused, an interrupted one resumed from its latest checkpoint, a new one started (`cammsr train` as a
subprocess, its output shown)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def train_or_resume(data: str, config: str | None, run_dir: Path, overrides: list[str]) -> dict:
    """The run's metrics.json once it has finished."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("test") is not None:
        print(f"{run_dir}: finished, reused", flush=True)
        return json.loads(metrics.read_text())
    resume = (run_dir / "checkpoints" / "latest").is_file()
    command = [sys.executable, "-m", "train.command", "--data", data, "--run-dir", str(run_dir),
               *(["--config", config] if config else []), *(["--resume"] if resume else []), *overrides]
    print(("resuming: " if resume else "training: ") + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"training {run_dir} failed (its output is above)")
    return json.loads(metrics.read_text())
