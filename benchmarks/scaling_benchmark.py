"""Scaling: a 10M-item ID table, TorchRec row-wise sharded, trained with sampled softmax at world size 1 and 2.

    python -m benchmarks.scaling_benchmark [--work-dir runs/scaling] [--catalogue 10000000] [--steps 100] ...

1. Data: the built-in synthetic source without images (`--base-items` catalogue, `--users` users, k-core 1), prepared
   once into WORK/data and reused. Items exist in a prepared dataset only if someone interacted with them, and
   writing ~10M item samples takes about 45 minutes and 20 GB on 2 cores (~4,000 items/s), so the catalogue is
   completed to `--catalogue` items with `data.extra_items` (ids after the dataset's: ID rows that no user touched,
   drawn as negatives and ranked in evaluation like any item). The table size is what is measured.
2. For each world size: `launch/single_node.sh --nproc W` (torchrun, gloo) runs this module with --worker, which
   builds the real Trainer (model.name=sasrec, model.loss_type=sampled_softmax, embedding.sharding=row_wise),
   runs --warmup + --steps optimizer steps of the first epoch, then exact full-ranking validation of a fixed subset
   of --eval-users users against every item; each rank reports its table rows and bytes (table + fused optimizer
   state), peak RSS (ru_maxrss) and RSS, and the timings. Torch threads per rank: --threads-per-rank (1).
3. Prints both runs side by side (markdown) with the machine and writes WORK/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from launch.arguments import parse_with_overrides

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the parent
def ensure_dataset(folder: Path, num_items: int, num_users: int, seed: int) -> tuple[Path, float]:
    """The prepared synthetic dataset (generated once; reused when its manifest says the same options)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        found = json.loads(manifest.read_text())
        source = found.get("source", {})
        if (source.get("num_items"), source.get("num_users"), source.get("seed"), source.get("with_images"),
                found.get("processing", {}).get("k_core")) == (num_items, num_users, seed, False, 1):
            return folder, 0.0
    from data_shards.prepare import PrepareOptions, prepare
    from data_shards.sources.synthetic import generate_synthetic
    start = time.perf_counter()
    prepare(generate_synthetic(num_items=num_items, num_users=num_users, seed=seed, with_images=False), folder,
            PrepareOptions(k_core=1, overwrite=True))
    return folder, time.perf_counter() - start


def run_world(world: int, args, data: Path, overrides: list[str]) -> dict:
    out = args.work_dir / f"world{world}.json"
    out.unlink(missing_ok=True)
    threads = args.threads_per_rank or max(1, len(os.sched_getaffinity(0)) // world)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    cmd = [str(ROOT / "launch" / "single_node.sh"), "--nproc", str(world), "--python", sys.executable, "--module",
           "benchmarks.scaling_benchmark", "--", "--worker", "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--run-dir", str(args.work_dir / f"run{world}"),
           *overrides]
    print(f"world size {world}: {threads} torch thread(s) per rank ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (args.work_dir / f"world{world}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"world_size": world, "failed": f"exit code {proc.returncode}", "log_tail": tail, "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    result["torch_threads_per_rank"] = threads
    return result


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _per_rank(result: dict, key: str, fmt) -> str:
    if "failed" in result:
        return f"failed ({result['failed']})"
    return " / ".join(fmt(rank[key]) for rank in result["ranks"])


def table(results: list[dict]) -> str:
    rows = [
        ("ID table rows per rank", "rows", lambda v: f"{v:,}"),
        ("table bytes per rank (fp32 rows)", "table_bytes", _gb),
        ("fused optimizer state per rank (row-wise Adagrad)", "optimizer_bytes", lambda v: f"{v / 1e6:.1f} MB"),
        ("table + optimizer state per rank", "table_and_optimizer_bytes", _gb),
        ("peak RSS during setup (ru_maxrss; a rank builds only its rows of the initial table)", "peak_rss_setup", _gb),
        ("RSS after setup (Trainer built)", "rss_after_setup", _gb),
        ("RSS after the timed steps", "rss_after_train", _gb),
        ("peak RSS up to the end of the timed steps (ru_maxrss)", "peak_rss_train", _gb),
        ("peak RSS including evaluation (ru_maxrss)", "peak_rss_eval", _gb),
        ("setup seconds (data, table, engine)", "setup_s", lambda v: f"{v:.1f}"),
    ]
    head = "| per rank (rank 0 / rank 1) | " + " | ".join(f"world size {r['world_size']}" for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(_per_rank(r, key, fmt) for r in results) + " |")
    lines.append("| **whole job** | " + " | ".join("" for _ in results) + " |")

    def job(label, fn):
        lines.append(f"| {label} | " + " | ".join("failed" if "failed" in r else fn(r) for r in results) + " |")

    job("torch threads per rank", lambda r: str(r["torch_threads"]))
    job("timed optimizer steps", lambda r: f"{r['steps']} (+{r['warmup']} warm-up)")
    job("steps/s", lambda r: f"{r['steps_per_s']:.2f}")
    job("samples/s (global batch)", lambda r: f"{r['samples_per_s']:,.0f}")
    job("mean recommendation loss, first / last 10 timed steps",
        lambda r: f"{r['loss_first']:.3f} / {r['loss_last']:.3f}")
    job("exact validation ranking: users x items, seconds",
        lambda r: (f"{r['eval_users']:,} x {r['catalogue']:,}: {r['eval_s']:.1f} s" if r.get("eval_s") is not None
                   else "skipped"))
    job("validation NDCG@10 / Recall@10 (subset)",
        lambda r: (f"{r['valid']['ndcg@10']:.4f} / {r['valid']['recall@10']:.4f}" if r.get("valid") else "-"))
    job("total sum of table+optimizer bytes over ranks",
        lambda r: _gb(sum(rank["table_and_optimizer_bytes"] for rank in r["ranks"])))
    job("wall seconds of the launch (start to exit)", lambda r: f"{r['wall_s']:.0f}")
    return "\n".join(lines)


def main_parent(args) -> int:
    from benchmarks.machine import describe_machine
    machine = describe_machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data, prep_s = ensure_dataset(args.data_dir or args.work_dir / "data", args.base_items, args.users, args.seed)
    manifest = json.loads((data / "manifest.json").read_text())
    extra = args.catalogue - manifest["num_items"]
    if extra < 0:
        raise SystemExit(f"--catalogue {args.catalogue} is smaller than the dataset's {manifest['num_items']} items")
    overrides = [
        "model=sasrec", f"model.hidden_size={args.hidden}", f"model.max_seq_len={args.max_seq_len}",
        "model.num_layers=2", "model.num_heads=2", f"model.ffn_inner_size={4 * args.hidden}",
        "model.loss_type=sampled_softmax", f"train.num_negatives={args.negatives}",
        f"train.negative_sampler={args.sampler}", f"train.batch_size={args.batch_size}", "train.precision=fp32",
        "train.batching=by_length",
        "embedding.backend=torchrec", "embedding.sharding=row_wise", f"data.extra_items={extra}",
        f"eval.max_users={args.eval_users}", "eval.batch_size=1024", "logging.tensorboard=false",
        "checkpoint.enabled=false", "eval.test=never", "distributed.timeout_s=1800"]
    print(f"machine: {machine}")
    print(f"data: {data} ({manifest['num_users']:,} users, {manifest['num_items']:,} items with interactions, "
          f"{manifest['num_interactions']:,} interactions; prepared in {prep_s:.0f} s"
          f"{' (reused)' if prep_s == 0 else ''}); catalogue {args.catalogue:,} items = dataset + {extra:,} "
          "extra items (data.extra_items)", flush=True)
    results = [run_world(world, args, data, overrides) for world in args.worlds]
    print()
    print(table(results))
    for result in results:
        if "failed" in result:
            print(f"\nworld size {result['world_size']} failed:\n{result['log_tail']}")
    summary = {"machine": machine, "machine_at_end": describe_machine(), "overrides": overrides,
               "dataset": {k: manifest[k] for k in ("num_users", "num_items", "num_interactions")},
               "catalogue": args.catalogue, "results": results}
    (args.work_dir / "scaling.json").write_text(json.dumps(summary, indent=1))
    print(f"\nload average at the end: {summary['machine_at_end']['load_average_1m']}; "
          f"details: {args.work_dir / 'scaling.json'}")
    return 0 if all("failed" not in r for r in results) else 1


# ---------------------------------------------------------------------------------------------------- the worker
def _rss() -> int:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main_worker(args) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from train.config import load_config
    from train.distributed import all_gather_objects
    from train.loop import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    cfg = load_config(None, [f"data.path={args.data}", *args.overrides])
    trainer = Trainer(cfg, args.run_dir)
    env = trainer.env
    setup_s = time.perf_counter() - start
    mine = {"rank": env.rank, "setup_s": setup_s, "rss_after_setup": _rss(), "peak_rss_setup": _peak_rss()}
    footprint = trainer.table.footprint()
    mine.update(footprint, table_and_optimizer_bytes=footprint["table_bytes"] + footprint["optimizer_bytes"])

    losses, samples = [], 0
    batches = trainer.plan.epoch_batches(0)
    total = args.warmup + args.steps
    if total > trainer.plan.steps_per_epoch:
        raise SystemExit(f"--warmup + --steps = {total} > {trainer.plan.steps_per_epoch} steps in an epoch")
    for index in range(total):
        if index == args.warmup:
            dist.barrier()
            timed_start = time.perf_counter()
        _, batch = next(batches)
        if index >= args.warmup:
            samples += int(batch.real.sum())
        terms, _, _ = trainer.train_step(batch)
        trainer.state["global_step"] += 1
        losses.append(terms.recommendation.detach().double().reshape(1))
    dist.barrier()
    train_s = time.perf_counter() - timed_start
    mine.update(rss_after_train=_rss(), peak_rss_train=_peak_rss())
    loss = torch.cat(losses[args.warmup:])
    if env.world_size > 1:
        dist.all_reduce(loss)
    loss = (loss / env.world_size).numpy()  # each rank's term is its share of the global mean
    count = torch.tensor([samples], dtype=torch.long)
    if env.world_size > 1:
        dist.all_reduce(count)

    valid, eval_s = None, None
    if cfg.eval.max_users > 0:
        dist.barrier()
        eval_start = time.perf_counter()
        valid = trainer.evaluate_split("valid")
        eval_s = time.perf_counter() - eval_start
    mine["peak_rss_eval"] = _peak_rss()
    ranks = all_gather_objects(mine)
    if env.is_main:
        result = {"world_size": env.world_size, "ranks": ranks, "steps": args.steps, "warmup": args.warmup,
                  "train_s": train_s, "steps_per_s": args.steps / train_s, "samples_per_s": int(count) / train_s,
                  "loss_first": float(np.mean(loss[:10])), "loss_last": float(np.mean(loss[-10:])),
                  "catalogue": trainer.num_items, "eval_users": valid["count"] if valid else 0, "eval_s": eval_s,
                  "valid": valid, "torch_threads": torch.get_num_threads()}
        Path(args.out).write_text(json.dumps(result, indent=1))
    trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "scaling")
    parser.add_argument("--data-dir", type=Path, help="prepared dataset folder (default WORK/data; made if absent)")
    parser.add_argument("--catalogue", type=int, default=10_000_000, help="items in the ID table (rows - 1)")
    parser.add_argument("--base-items", type=int, default=1_000_000, help="synthetic catalogue the users draw from")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worlds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--negatives", type=int, default=8192, help="shared negatives per global step")
    parser.add_argument("--sampler", choices=["uniform", "popularity"], default="uniform")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--eval-users", type=int, default=256,
                        help="fixed subset ranked exactly against every item (0 = skip evaluation)")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="torch threads per rank (0 = cores // world). 1 by default: on a shared 2-core machine "
                             "world size 1 with 2 threads measured 0.58 steps/s against 4.14 with 1 thread")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parse_with_overrides(parser, argv)
    if args.worker:
        return main_worker(args)
    if args.eval_users == 0:
        print("evaluation skipped (--eval-users 0)")
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
