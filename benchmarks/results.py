"""Result records: one small JSON per measured number under benchmarks/results/, written by the script that
measured it, read by `benchmarks.results_page` to draw BENCHMARKS.md (so the page cannot drift from the data).

A record: id (its file name), area (the page section), claim, metric, ours, reference (the peer's or the paper's
number, with its name; null where none), higher_is_better, headline (in the table at the top), details (a few
named numbers for the section table), ranking (how ties were counted), machine, date, commit, command.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.machine import describe_machine

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIE_AWARE = "ties as a random order (cammsr.metrics)"
FIELDS = ("id", "area", "claim", "metric", "ours", "reference", "higher_is_better", "headline", "details", "ranking",
          "machine", "date", "commit", "command")


def machine_line(machine: dict) -> str:
    cores = machine["cores"]
    device = machine.get("gpu") or f"{machine['cpu']}, {cores} core{'' if cores == 1 else 's'}, no GPU"
    return f"{device}; torch {machine['torch']}"


def current_commit() -> str:
    """The short commit of the working tree, "+ changes" when it differs from it (the number is then of code
    that no commit holds yet, which the page says). The results folder and the page are outputs, not code: a record
    or a note written but not yet committed changes nothing that measured."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)BENCHMARKS.md"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + changes" if dirty else "")


def write_record(record_id: str, *, area: str, claim: str, metric: str, ours: float, command: str,
                 reference: dict | None = None, higher_is_better: bool = True, headline: bool = False,
                 details: dict | None = None, ranking: str = TIE_AWARE, results_dir: Path = RESULTS_DIR,
                 machine: dict | None = None) -> Path:
    machine = machine or describe_machine()
    record = {"id": record_id, "area": area, "claim": claim, "metric": metric, "ours": ours,
              "reference": reference, "higher_is_better": higher_is_better, "headline": headline,
              "details": details or {}, "ranking": ranking, "machine": machine_line(machine),
              "date": machine["date"], "commit": current_commit(), "command": command}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{record_id}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {path}")
    return path


def read_records(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every record, sorted by area then id; a record missing a field stops with its file and the field."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        missing = [name for name in FIELDS if name not in record]
        if missing:
            raise ValueError(f"{path}: record without {', '.join(missing)}")
        if record["id"] != path.stem:
            raise ValueError(f"{path}: id {record['id']!r} differs from the file name")
        records.append(record)
    return sorted(records, key=lambda r: (r["area"], r["id"]))
