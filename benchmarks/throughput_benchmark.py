"""Training throughput, side by side in one run on the same prepared data and machine: RecBole 1.2.1's SASRec
(the peer), our SASRec and our CAMMSR.

    python -m benchmarks.throughput_benchmark --dataset beauty                  # the benchmark (quiet machine)
    python -m benchmarks.throughput_benchmark --dataset beauty --epochs 1 --peer-max-train-batches 8   # smoke

A "sample" is one (prefix, next item) training pair of the paper's protocol (RecBole: one training prefix; each
user's training part i_1..i_T gives T-1 of them; Beauty: 131,413). RecBole trains every pair as its own sequence
pass (history cut to the last max_seq_len items). Our all-positions mode trains all of them in one causal pass per
window of max_seq_len targets (one window per user on Beauty except 127 long histories), in batches of similar
lengths (train.batching=by_length).

Systems (each a subprocess, one after the other, same torch thread count):
  recbole-sasrec  benchmarks/peers/recbole_sasrec.py in the peer venv (.peer-venv/recbole; fair mode: anomaly
                  detection off and glibc malloc thresholds, see benchmarks/peers/README.md), on the RecBole files
                  the prepared data was made from (checked: same users, items, interactions and pairs).
  sasrec, cammsr  `cammsr train` (world size 1) with --config and model.name=sasrec / the config as is; evaluation
                  only after the last epoch and outside the timed epoch, no checkpoints.
Seconds per epoch: each side's own epoch timer (RecBole's _train_epoch, our trainer's epoch loop; both include
their data loading, neither the validation). With >= 2 epochs the mean over the epochs after the first is used
(the first includes warm-up), on both sides; with 1 epoch the first. A peer capped at K batches per epoch gives a
PROJECTED epoch time (pairs per epoch / measured samples/s), marked as such.

Prints the table, the machine, load averages, threads, versions and date; writes the same as JSON to
runs/throughput/<dataset>-<UTC time>/result.json (runs/ is git-ignored) next to each system's log and outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.machine import describe_machine
from launch.arguments import parse_with_overrides

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "recbole_sasrec.py"
DEFAULT_PEER_PYTHON = ROOT / ".peer-venv" / "recbole" / "bin" / "python"
DATASETS = {  # --dataset NAME -> (prepared data, config); --data / --config override
    "beauty": ("data/beauty", "configs/beauty_recbole.yaml"),
    "ml1m": ("data/ml1m", "configs/ml1m.yaml"),
}
SYSTEMS = ("recbole-sasrec", "sasrec", "cammsr")
EPOCH_LINE = re.compile(r"^epoch (\d+): loss .* in ([0-9.]+)s\s*$")
PLAN_LINE = re.compile(r"(\d[\d,]*) steps/epoch of (\d+ \w+)")  # the trainer's batch_size and batch_unit


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--data", type=Path, help="prepared dataset folder (default: data/<dataset>)")
    p.add_argument("--config", type=Path, help="our YAML config (default: configs/<dataset>.yaml)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all three)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every system (default 2: the first "
                   "is warm-up, the second is reported)")
    p.add_argument("--peer-epochs", type=int, help="RecBole's epochs, if different from --epochs")
    p.add_argument("--peer-max-train-batches", type=int, default=None,
                   help="cap RecBole's epochs at K batches of 1024 (smoke runs: the epoch time is then projected)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch intra-op threads of every system (default: the cores this process may use)")
    p.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON,
                   help="python of the RecBole venv (benchmarks/peers/setup_recbole.sh makes it)")
    p.add_argument("--out", type=Path, help="output folder (default: runs/throughput/<dataset>-<UTC time>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="extra overrides for both of our runs (e.g. embedding.backend=torch)")
    args = parse_with_overrides(p, argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not args.systems:
        p.error(f"--systems: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    data, config = DATASETS[args.dataset]
    args.data = (args.data or ROOT / data).resolve()
    args.config = (args.config or ROOT / config).resolve()
    args.peer_epochs = args.peer_epochs or args.epochs
    if args.epochs < 1 or args.peer_epochs < 1:
        p.error("--epochs must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- the data's pairs
def protocol_pairs(data_dir: Path, max_len: int) -> dict:
    """The paper's (prefix, next item) training pairs per epoch (every one is a target in both sequence modes)."""
    from data_shards.reader import PreparedDataset
    data = PreparedDataset(data_dir, verify=False)
    lengths = np.asarray([len(seq.items) for seq in data.user_sequences(0, 1)], dtype=np.int64)
    pairs = np.maximum(lengths - 2 - 1, 0)  # training part = all but the last two (valid, test)
    return {"users": int(len(lengths)), "items": data.num_items, "interactions": int(lengths.sum()),
            "pairs": int(pairs.sum()), "all_positions_windows": int((-(-pairs // max_len)).sum()),
            "max_seq_len": max_len, "manifest": data.manifest}


# ---------------------------------------------------------------------------------------------- subprocesses
def stream(cmd: list[str], log_path: Path, prefix: str, env: dict, cwd: Path) -> tuple[int, list[str], float]:
    """Run cmd, echo its lines with a prefix, keep them in log_path; returns (rc, lines, wall seconds)."""
    lines: list[str] = []
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=cwd, bufsize=1)
        for raw in proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                log.write(line + "\n")
                lines.append(line)
                if line.strip() and not _is_noise(line):
                    print(f"  [{prefix}] {line}", flush=True)
        rc = proc.wait()
    return rc, lines, time.perf_counter() - start


def _is_noise(line: str) -> bool:
    """Progress bars and per-line warnings stay in the log file only."""
    return ("it/s]" in line or "s/it]" in line or "item/s]" in line or "shard/s]" in line
            or "Warning" in line or line.startswith("  warnings.warn"))


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def steady(seconds: list[float]) -> tuple[float, str]:
    """Mean epoch seconds after the first when there are >= 2 epochs, else the first (warm-up included)."""
    if len(seconds) >= 2:
        return sum(seconds[1:]) / len(seconds[1:]), f"mean of epochs 2..{len(seconds)}"
    return seconds[0], "epoch 1 (includes warm-up)"


def run_peer(args, pairs: dict, out: Path) -> dict:
    manifest = pairs["manifest"]
    source = manifest.get("source", {})
    if source.get("name") != "recbole":
        raise SystemExit(f"{args.data}: prepared from a {source.get('name')!r} source; the peer needs the RecBole "
                         "atomic files the data was made from (prepare with --source recbole)")
    peer_dir = Path(source["input"])
    if not peer_dir.is_absolute():
        peer_dir = (ROOT / peer_dir).resolve()
    if not args.peer_python.exists():
        raise SystemExit(f"no RecBole venv at {args.peer_python}: run benchmarks/peers/setup_recbole.sh")
    result_path = out / "recbole_sasrec.json"
    cmd = [str(args.peer_python), str(PEER_SCRIPT), "--data-dir", str(peer_dir), "--dataset", manifest["name"],
           "--epochs", str(args.peer_epochs), "--out", str(result_path), "--threads", str(args.threads)]
    if args.peer_max_train_batches:
        cmd += ["--max-train-batches", str(args.peer_max_train_batches)]
    load_before = load_average()
    rc, _, wall = stream(cmd, out / "recbole_sasrec.log", "recbole", thread_env(args.threads), ROOT)
    if rc != 0:
        raise SystemExit(f"RecBole peer failed (exit {rc}); see {out / 'recbole_sasrec.log'}")
    peer = json.loads(result_path.read_text())
    d = peer["data"]
    same = {"users": (d["users"], pairs["users"]), "items": (d["items"], pairs["items"]),
            "interactions": (d["interactions"], pairs["interactions"]), "pairs": (d["train_prefixes"], pairs["pairs"])}
    mismatch = {k: v for k, v in same.items() if v[0] != v[1]}
    if mismatch:
        raise SystemExit(f"the peer's data differs from {args.data} (peer, ours): {mismatch}; not the same data")
    per_epoch = peer["training"]["per_epoch"]
    seconds = [e["seconds"] for e in per_epoch]
    samples = [e["samples"] for e in per_epoch]
    capped = peer["training"]["capped"]
    if capped:  # samples/s over the epochs after the first when there are several, else epoch 1
        use = slice(1, None) if len(per_epoch) >= 2 else slice(0, 1)
        rate = sum(samples[use]) / sum(seconds[use])
        epoch_s = pairs["pairs"] / rate
        how = (f"PROJECTED: {pairs['pairs']:,} pairs / {rate:.0f} samples/s measured over "
               f"{sum(samples[use]):,} samples ({len(samples[use])} epoch(s) capped at "
               f"{args.peer_max_train_batches} batches{', the first epoch left out' if len(per_epoch) >= 2 else ''})")
    else:
        epoch_s, how = steady(seconds)
        rate = pairs["pairs"] / epoch_s
    return {"system": "RecBole 1.2.1", "model": "SASRec", "mode": "one pass per prefix (RecBole), fair mode",
            "samples_per_epoch": pairs["pairs"], "seconds_per_epoch": round(epoch_s, 2),
            "samples_per_s": round(rate, 1), "epoch_time_basis": how, "projected": capped,
            "epochs_run": len(per_epoch), "per_epoch_seconds": seconds, "per_epoch_samples": samples,
            "steps_per_epoch": -(-pairs["pairs"] // int(peer["recbole_config"].get("train_batch_size", 1024))),
            "batch": f"{peer['recbole_config'].get('train_batch_size')} prefixes",
            "torch_threads": peer["torch_threads"], "versions": peer["versions"], "fairness": peer["fairness"],
            "parameters": peer["model"]["parameters"], "load_average_before": load_before,
            "load_average_after": load_average(), "process_wall_seconds": round(wall, 1),
            "log": str(out / "recbole_sasrec.log"), "json": str(result_path)}


def ensure_features(args, out: Path) -> dict | None:
    """Build the feature stores CAMMSR needs before any timing (the trainer would, but not inside the timer
    either); returns how long it took, or None when they were already there."""
    from data_shards.features.store import open_store
    from data_shards.reader import PreparedDataset
    from train.config import load_config
    cfg = load_config(args.config, list(args.overrides))
    needed = [m for m in ("text", "image") if m in cfg.model.modalities]
    data = PreparedDataset(args.data, verify=False)
    missing = [m for m in needed if open_store(data, m) is None]
    if not missing:
        return None
    print(f"feature stores missing for {missing}: building them first (not part of any timing)", flush=True)
    cmd = [sys.executable, "-m", "launch.cli", "extract", "--data", str(args.data), "--modalities", *missing]
    rc, _, wall = stream(cmd, out / "extract.log", "extract", thread_env(args.threads), ROOT)
    if rc != 0:
        raise SystemExit(f"feature extraction failed (exit {rc}); see {out / 'extract.log'}")
    print(f"feature extraction ({', '.join(missing)}): {wall:.1f} s", flush=True)
    return {"modalities": missing, "seconds": round(wall, 1)}


def run_ours(args, name: str, pairs: dict, out: Path) -> dict:
    import yaml
    run_dir = out / name
    overrides = [f"model.name={name}", f"train.max_epochs={args.epochs}", f"eval.every={args.epochs}",
                 "checkpoint.enabled=false", "eval.test=never", *args.overrides]
    cmd = [sys.executable, "-m", "launch.cli", "train", "--data", str(args.data), "--config", str(args.config),
           "--run-dir", str(run_dir), *overrides]
    load_before = load_average()
    rc, lines, wall = stream(cmd, out / f"{name}.log", name, thread_env(args.threads), ROOT)
    if rc != 0:
        raise SystemExit(f"our {name} run failed (exit {rc}); see {out / f'{name}.log'}")
    seconds = [float(m.group(2)) for m in map(EPOCH_LINE.match, lines) if m]
    if len(seconds) != args.epochs:
        raise SystemExit(f"our {name} run logged {len(seconds)} epoch times, expected {args.epochs}; "
                         f"see {out / f'{name}.log'}")
    try:  # the same timer, 3 decimals, for the epochs that were validated
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        for record in history:
            seconds[record["epoch"]] = record["epoch_seconds"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = resolved["model"]
    mode = model["sequence_mode"]
    covered = pairs["pairs"]
    epoch_s, how = steady(seconds)
    plan = next((m for m in map(PLAN_LINE.search, lines) if m), None)
    parts = ["+".join(model["modalities"])] if name == "cammsr" else ["id"]
    if name == "cammsr" and model.get("use_category_guidance"):
        parts.append("categories")
    mode_text = ("all positions, one causal pass per window" if mode == "all_positions" else "one pass per prefix")
    return {"system": "cammsr (ours)", "model": "CAMMSR" if name == "cammsr" else "SASRec",
            "mode": f"{mode_text}; {' + '.join(parts)}", "samples_per_epoch": covered,
            "seconds_per_epoch": round(epoch_s, 2), "samples_per_s": round(covered / epoch_s, 1),
            "epoch_time_basis": how, "projected": False, "epochs_run": len(seconds),
            "per_epoch_seconds": seconds, "per_epoch_samples": [covered] * len(seconds),
            "steps_per_epoch": int(plan.group(1).replace(",", "")) if plan else None,
            "batch": plan.group(2) if plan else None,
            "precision": resolved["train"]["precision"], "embedding_backend": resolved["embedding"]["backend"],
            "overrides": overrides, "torch_threads": args.threads, "load_average_before": load_before,
            "load_average_after": load_average(), "process_wall_seconds": round(wall, 1),
            "log": str(out / f"{name}.log"), "run_dir": str(run_dir)}


# ---------------------------------------------------------------------------------------------- report
def our_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "torchrec", "fbgemm-gpu-cpu", "deepspeed", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        out["cammsr_git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                  capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["cammsr_worktree_modified"] = bool(dirty)  # the run measured uncommitted code: say which
        out["cammsr_modified_files"] = [line[3:] for line in dirty.splitlines()]
    except Exception:
        pass
    return out


def table(rows: list[dict], peer: dict | None) -> str:
    head = ["system", "model", "mode", "samples/epoch", "s/epoch", "samples/s", "x RecBole samples/s",
            "epoch time / RecBole's"]
    body = []
    for r in rows:
        ratio = f"{r['samples_per_s'] / peer['samples_per_s']:.2f}x" if peer else "-"
        time_ratio = f"{r['seconds_per_epoch'] / peer['seconds_per_epoch']:.2f}" if peer else "-"
        secs = f"{r['seconds_per_epoch']:.1f}" + (" (projected)" if r["projected"] else "")
        body.append([r["system"], r["model"], r["mode"], f"{r['samples_per_epoch']:,}", secs,
                     f"{r['samples_per_s']:,.0f}", ratio, time_ratio])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def goals(results: dict) -> list[dict]:
    peer, ours_sasrec, ours_cammsr = (results.get(k) for k in SYSTEMS)
    out = []
    if peer and ours_cammsr:
        met = ours_cammsr["seconds_per_epoch"] <= peer["seconds_per_epoch"]
        out.append({"goal": "our CAMMSR epoch no slower than RecBole's SASRec epoch", "met": met,
                    "detail": f"{ours_cammsr['seconds_per_epoch']:.1f} s vs {peer['seconds_per_epoch']:.1f} s"
                              + (" (RecBole's projected)" if peer["projected"] else "")})
    if peer and ours_sasrec:
        ratio = ours_sasrec["samples_per_s"] / peer["samples_per_s"]
        out.append({"goal": "our SASRec >= 3x RecBole's SASRec samples/s", "met": ratio >= 3.0,
                    "detail": f"{ratio:.2f}x ({ours_sasrec['samples_per_s']:,.0f} vs {peer['samples_per_s']:,.0f})"
                              + (" (RecBole's from capped epochs)" if peer["projected"] else "")})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = (args.out or ROOT / "runs" / "throughput" / f"{args.dataset}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=False)
    started, load_start, t0 = now_utc(), load_average(), time.perf_counter()
    machine = describe_machine()
    print(f"throughput benchmark: {args.dataset} ({args.data}), config {args.config}, systems "
          f"{', '.join(args.systems)}, {args.epochs} epoch(s) each"
          + (f" (RecBole {args.peer_epochs})" if args.peer_epochs != args.epochs else "")
          + f", {args.threads} torch threads; output {out}", flush=True)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, gpu {machine['gpu']}; load average "
          f"{load_start} at {started}", flush=True)

    from train.config import load_config
    cfg = load_config(args.config, list(args.overrides))
    pairs = protocol_pairs(args.data, cfg.model.max_seq_len)
    print(f"data: {pairs['users']:,} users, {pairs['items']:,} items, {pairs['interactions']:,} interactions; "
          f"{pairs['pairs']:,} (prefix, next item) training pairs per epoch (the paper's protocol), "
          f"{pairs['all_positions_windows']:,} all-positions windows of at most {pairs['max_seq_len']}", flush=True)

    results: dict = {}
    extraction = None
    for system in args.systems:
        print(f"--- {system} (load average {load_average()})", flush=True)
        if system == "recbole-sasrec":
            results[system] = run_peer(args, pairs, out)
        else:
            if system == "cammsr":
                extraction = ensure_features(args, out)
            results[system] = run_ours(args, system, pairs, out)
        r = results[system]
        print(f"--- {system}: {r['seconds_per_epoch']:.1f} s/epoch ({r['epoch_time_basis']}), "
              f"{r['samples_per_s']:,.0f} samples/s; load average {r['load_average_before']} -> "
              f"{r['load_average_after']}", flush=True)

    peer = results.get("recbole-sasrec")
    rows = [results[s] for s in SYSTEMS if s in results]
    load_end = load_average()
    record = {
        "benchmark": "training throughput, samples = (prefix, next item) pairs of the paper's protocol",
        "dataset": args.dataset, "data": str(args.data), "config": str(args.config),
        "data_counts": {k: v for k, v in pairs.items() if k != "manifest"},
        "epochs": args.epochs, "peer_epochs": args.peer_epochs, "peer_max_train_batches": args.peer_max_train_batches,
        "torch_threads": args.threads, "started": started, "finished": now_utc(),
        "wall_seconds": round(time.perf_counter() - t0, 1), "machine": machine,
        "load_average_start": load_start, "load_average_end": load_end,
        "versions": {"ours": our_versions(), "recbole_venv": peer["versions"] if peer else None},
        "feature_extraction": extraction, "results": results, "goals": goals(results),
        "command": [sys.executable, "-m", "benchmarks.throughput_benchmark",
                    *(argv if argv is not None else sys.argv[1:])],
    }
    (out / "result.json").write_text(json.dumps(record, indent=2))

    print()
    print(f"Training throughput on {args.dataset}: samples = (prefix, next item) pairs of the paper's protocol "
          f"({pairs['pairs']:,} per epoch, on both sides)")
    print(table(rows, peer))
    for r in rows:
        print(f"  {r['model']} ({r['system']}): {r['epoch_time_basis']}; {r['steps_per_epoch']} steps/epoch of "
              f"{r['batch']}; per-epoch seconds {r['per_epoch_seconds']}")
    if peer:
        print(f"  RecBole: {peer['fairness']['statement']}")
    for g in record["goals"]:
        print(f"goal: {g['goal']}: {'MET' if g['met'] else 'NOT MET'} ({g['detail']})")
    v = record["versions"]["ours"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, gpu {machine['gpu']}; torch threads "
          f"{args.threads} (every system); load average {load_start} at start, {load_end} at end")
    print(f"versions: ours torch {v.get('torch')}, torchrec {v.get('torchrec')}, deepspeed {v.get('deepspeed')}, "
          f"cammsr {v.get('cammsr_git_commit')}{' (modified)' if v.get('cammsr_worktree_modified') else ''}"
          + (f"; peer recbole {peer['versions'].get('recbole')}, torch {peer['versions'].get('torch')}"
             if peer else ""))
    print(f"date: {started} .. {record['finished']} ({record['wall_seconds']:.0f} s); wrote {out / 'result.json'}")
    return record


if __name__ == "__main__":
    main()
