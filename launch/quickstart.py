"""`cammsr quickstart`: the main job end to end on the built-in synthetic dataset.

prepare (procedural JPEGs, titles, categories, histories) -> extract (image and text encoders) -> train CAMMSR
-> train the SASRec baseline on the same split -> RUN/summary.json, a report with plots, and where to look.
"""
from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_shards.features.extract import ExtractOptions, extract_features
from data_shards.prepare import PrepareOptions, prepare
from data_shards.sources.synthetic import generate_synthetic
from train.config import load_config
from train.report import write_report

# configs/ of the source tree, installed as the package cammsr_configs (pyproject.toml); a real file either way
CONFIG = Path(str(importlib.resources.files("cammsr_configs") / "quickstart.yaml"))


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_quickstart(run_dir: Path, num_items: int, num_users: int, seed: int, overrides: list[str]) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = _stage("1/5 prepare: synthetic raw media -> WebDataset shards")
    data_dir = run_dir / "data"
    raw = generate_synthetic(num_items=num_items, num_users=num_users, seed=seed)
    manifest = prepare(raw, data_dir, PrepareOptions(k_core=5, overwrite=True))
    timings["prepare_s"] = time.perf_counter() - start

    cfg = load_config(CONFIG, [f"data.path={data_dir}", *overrides])
    start = _stage("2/5 extract: image and text encoders -> feature store")
    extract_features(data_dir, ExtractOptions(text_encoder=cfg.data.text_encoder, image_encoder=cfg.data.image_encoder,
                                              image_size=cfg.data.image_size, batch_size=cfg.data.extract_batch_size))
    timings["extract_s"] = time.perf_counter() - start

    results = {}
    for step, model in (("3/5", "cammsr"), ("4/5", "sasrec")):
        start = _stage(f"{step} train {model.upper()} (validation each epoch; test once, with the best epoch's "
                       "checkpoint)")
        results[model] = _train(data_dir, run_dir / model, [f"model.name={model}", *overrides])
        timings[f"train_{model}_s"] = time.perf_counter() - start

    start = _stage("5/5 report")
    plots = write_report(run_dir / "cammsr")
    timings["report_s"] = time.perf_counter() - start
    summary = {
        "dataset": {key: manifest[key] for key in ("num_users", "num_items", "num_interactions",
                                                   "num_items_with_image")},
        **{model: {"valid": result["valid"], "test": result["test"], "best_epoch": result.get("best_epoch")}
           for model, result in results.items()},
        "timings_s": {key: round(value, 1) for key, value in timings.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(run_dir, summary, plots)
    return summary


def _train(data_dir: Path, model_run: Path, overrides: list[str]) -> dict:
    """One training per process: DeepSpeed keeps process-group state that a second engine in the same
    process would trip over, and a fresh process is what a user's own `cammsr train` gets anyway."""
    if (model_run / "config.yaml").exists():
        print(f"replacing the previous quickstart run in {model_run}")
        shutil.rmtree(model_run)
    subprocess.run([sys.executable, "-m", "train.command", "--data", str(data_dir), "--config", str(CONFIG),
                    "--run-dir", str(model_run), *overrides], check=True)
    return json.loads((model_run / "metrics.json").read_text())


def _print_summary(run_dir: Path, summary: dict, plots: list[Path]) -> None:
    print("\n=== done ===")
    header = f"{'':8s} {'ndcg@5':>8s} {'ndcg@10':>8s} {'mrr@10':>8s} {'recall@10':>9s}"
    print(f"{header}   (test, at the best validation epoch)")
    for model in ("cammsr", "sasrec"):
        test = summary[model]["test"]
        print(f"{model:8s} {test['ndcg@5']:8.4f} {test['ndcg@10']:8.4f} {test['mrr@10']:8.4f} {test['recall@10']:9.4f}")
    gain = summary["cammsr"]["test"]["ndcg@10"] / max(summary["sasrec"]["test"]["ndcg@10"], 1e-12)
    print(f"CAMMSR / SASRec test NDCG@10: {gain:.2f}x")
    print(f"summary:      {run_dir / 'summary.json'}")
    print(f"runs:         {run_dir / 'cammsr'} and {run_dir / 'sasrec'} (metrics.json, config.yaml, checkpoints/)")
    print("report:       " + ", ".join(str(p) for p in plots))
    print(f"TensorBoard:  tensorboard --logdir {run_dir}")
    print(f"recommend:    {_recommend_command(run_dir)}")


def _recommend_command(run_dir: Path) -> str:
    """`cammsr recommend` on the CAMMSR run for the last items of the first user's history (original ids)."""
    from data_shards.reader import PreparedDataset
    from train.recommend import Catalogue
    data = PreparedDataset(run_dir / "data", verify=False)
    catalogue = Catalogue.read(data)
    history = next(data.user_sequences()).items[-5:]
    script = Path(sys.executable).parent / "cammsr"
    program = str(script) if script.exists() else f"{sys.executable} -m launch.cli"
    return (f"{program} recommend --run {run_dir / 'cammsr'} --history "
            + ",".join(catalogue.describe(int(i))[0] for i in history))
