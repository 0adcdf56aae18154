"""RecBole 1.2.1's SASRec on our data and the paper's protocol: the PEER side of the cammsr benchmarks.

Run it with the peer venv's python (benchmarks/peers/setup_recbole.sh makes it); RecBole is never a dependency of
the cammsr project and this file imports nothing from it:

    .peer-venv/recbole/bin/python benchmarks/peers/recbole_sasrec.py \
        --data-dir /work/shared/data/amazon_beauty --dataset Beauty --epochs 1 --out runs/peer/beauty.json

Fair by default (say so wherever the numbers are shown; --stock runs RecBole exactly as shipped, to report both):
  * anomaly detection off: importing RecBole's sequential models runs `torch.autograd.set_detect_anomaly(True)`
    (a module-level call in its SINE model), process-wide; it makes SASRec ~1.3x slower and changes no result.
  * glibc malloc thresholds MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 1 GiB (set by re-executing this
    script with them in the environment; glibc reads them at process start): ~1.37x less time per step, identical
    results. With --stock they are removed from the environment instead.
Always (a compatibility fix, not a speed-up): the best checkpoint is loaded with torch.load(weights_only=False),
because torch >= 2.6 defaults to weights_only=True and RecBole's checkpoint pickles its Config.

Writes one JSON with per-epoch training seconds, samples, samples/s, evaluation seconds, validation metrics, the
test metrics at the best validation epoch, the parameter count, the exact RecBole config, versions, fairness
settings and the machine. Streams one progress line per epoch on stdout (lines start with "[peer]").
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
_REEXEC_MARK = "CAMMSR_PEER_REEXEC"

# The paper's protocol and SASRec config; everything else is RecBole 1.2.1's default (recorded in the JSON).
PAPER_CONFIG = {
    # model (these equal RecBole's SASRec.yaml defaults; written out so the run does not depend on them)
    "hidden_size": 64,
    "inner_size": 256,
    "n_layers": 2,
    "n_heads": 2,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "MAX_ITEM_LIST_LENGTH": 50,
    # training
    "train_batch_size": 1024,
    "learning_rate": 0.001,
    "learner": "adam",
    "stopping_step": 10,
    "eval_step": 1,
    "train_neg_sample_args": None,  # CE over all items: no negative sampling
    # evaluation: leave-one-out by time, full ranking over all items
    "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
    "repeatable": True,
    "metrics": ["NDCG", "MRR", "Recall", "Hit"],
    "topk": [5, 10],
    "valid_metric": "NDCG@10",
    "valid_metric_bigger": True,
    "eval_batch_size": 8192,  # users per full-ranking batch; does not change any metric
    # data: the atomic .inter file as is (Beauty is already 5-core: no filtering, no de-duplication)
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)",
    "item_inter_num_interval": "[0,inf)",
    "rm_dup_inter": None,
    "val_interval": None,
    # environment
    "seed": 2020,
    "reproducibility": True,
    "use_gpu": False,
    "worker": 0,
    "show_progress": False,
    "save_dataset": False,
    "save_dataloaders": False,
    "log_wandb": False,
    "state": "INFO",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding <dataset>.inter (RecBole atomic format)")
    p.add_argument("--dataset", required=True, help="RecBole dataset name: the .inter file's stem, e.g. Beauty")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--config-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RecBole config overrides; values parsed as Python literals when possible "
                        "(e.g. train_batch_size=512 topk=[5,10]), else kept as strings")
    p.add_argument("--stock", action="store_true",
                   help="RecBole as shipped: anomaly detection left on, no malloc thresholds")
    p.add_argument("--max-train-batches", type=int, default=None,
                   help="smoke runs only: stop each training epoch after this many batches (recorded in the JSON)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own default, recorded in the JSON)")
    p.add_argument("--work-dir", default=None,
                   help="where RecBole writes its log/, log_tensorboard/ and checkpoint (default: a temporary "
                        "folder, removed afterwards)")
    return p.parse_args(argv)


def parse_overrides(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--config-overrides: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def reexec_with_malloc_env(stock: bool):
    """glibc reads MALLOC_* only at process start: re-execute once with the environment this mode asks for."""
    if os.environ.get(_REEXEC_MARK) == "1":
        return
    env = dict(os.environ)
    env[_REEXEC_MARK] = "1"
    for k, v in MALLOC_ENV.items():
        if stock:
            env.pop(k, None)
        else:
            env[k] = v
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even if a machine had one
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


def describe_machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "os_cpu_count": os.cpu_count(),
            "memory_gib": mem_gib, "hostname": platform.node(), "platform": platform.platform(),
            "python": platform.python_version()}


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def now_utc():
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def log(msg):
    print(f"[peer] {msg}", flush=True)


def jsonable(x):
    """RecBole's config holds enums, torch.device, numpy scalars: make it JSON (exactly what was used, as text)."""
    import enum
    import numpy as np
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return f"{type(x).__name__}.{x.name}"
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x) if not isinstance(x, type) else f"{x.__module__}.{x.__qualname__}"


def versions() -> dict:
    from importlib.metadata import version, PackageNotFoundError
    out = {}
    for n in ["recbole", "torch", "numpy", "pandas", "scipy", "scikit-learn", "setuptools", "ray"]:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    out["python"] = platform.python_version()
    return out


def git_commit():
    try:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def main(argv=None):
    args = parse_args(argv)
    reexec_with_malloc_env(args.stock)

    out_path = os.path.abspath(args.out)
    data_dir = os.path.abspath(args.data_dir)
    inter = os.path.join(data_dir, f"{args.dataset}.inter")
    if not os.path.isfile(inter):
        raise SystemExit(f"no {inter}")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    started = now_utc()
    load_at_start = load_average()
    t_process = time.perf_counter()

    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # pandas/torch deprecation noise from RecBole
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    anomaly_before_import = torch.is_anomaly_enabled()
    # The same import path as RecBole's own quick_start (get_model imports the sequential package, whose SINE
    # module turns anomaly detection on).
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import init_seed, init_logger, get_model, get_trainer
    import recbole.model.sequential_recommender  # noqa: F401  (this import is what enables anomaly detection)
    anomaly_after_import = torch.is_anomaly_enabled()
    if not args.stock:
        torch.autograd.set_detect_anomaly(False)

    work_dir = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="recbole_peer_")
    os.makedirs(work_dir, exist_ok=True)
    # RecBole reads <data_path>/<dataset>/<dataset>.inter: point a symlink at the shared folder (read-only use).
    data_root = os.path.join(work_dir, "data")
    os.makedirs(data_root, exist_ok=True)
    link = os.path.join(data_root, args.dataset)
    if not os.path.lexists(link):
        os.symlink(data_dir, link)
    os.chdir(work_dir)  # RecBole writes ./log and ./log_tensorboard relative to the working directory

    overrides = parse_overrides(args.config_overrides)
    config_dict = dict(PAPER_CONFIG)
    config_dict.update({"epochs": args.epochs, "data_path": data_root,
                        "checkpoint_dir": os.path.join(work_dir, "saved")})
    config_dict.update(overrides)
    argv_saved, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config also parses --key=value from sys.argv
    try:
        config = Config(model="SASRec", dataset=args.dataset, config_dict=config_dict)
    finally:
        sys.argv = argv_saved
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)

    t0 = time.perf_counter()
    dataset = create_dataset(config)
    n_users, n_items, n_inter = dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num  # before the split
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_seconds = time.perf_counter() - t0
    log(f"{args.dataset}: {n_users} users, {n_items} items, {n_inter} "
        f"interactions; {len(train_data._dataset)} training prefixes, {len(valid_data._dataset)} valid, "
        f"{len(test_data._dataset)} test ({data_seconds:.1f} s to load and split)")

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as RecBole's run_recbole
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer_cls = get_trainer(config["MODEL_TYPE"], config["model"])
    assert trainer_cls is Trainer, f"SASRec's RecBole trainer is {trainer_cls}, this runner wraps Trainer"

    epochs: list[dict] = []
    evals: list[dict] = []
    max_batches = args.max_train_batches

    class _Capped:
        """The training dataloader, cut after max_batches batches (smoke runs only)."""

        def __init__(self, loader, n):
            self._loader, self._n = loader, n

        def __iter__(self):
            for i, batch in enumerate(self._loader):
                if i >= self._n:
                    break
                yield batch

        def __len__(self):
            return min(len(self._loader), self._n)

        def __getattr__(self, name):
            return getattr(self._loader, name)

    class PeerTrainer(Trainer):
        """RecBole's Trainer, unchanged except: it times and counts each epoch, and loads checkpoints with
        weights_only=False (torch >= 2.6; RecBole's checkpoint pickles its Config)."""

        def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
            counter = {"samples": 0, "batches": 0}
            base = loss_func or self.model.calculate_loss

            def counting_loss(interaction):
                counter["samples"] += len(interaction)
                counter["batches"] += 1
                return base(interaction)

            data = _Capped(train_data, max_batches) if max_batches else train_data
            anomaly = torch.is_anomaly_enabled()
            t = time.perf_counter()
            loss = super()._train_epoch(data, epoch_idx, loss_func=counting_loss, show_progress=show_progress)
            secs = time.perf_counter() - t
            total = sum(loss) if isinstance(loss, tuple) else loss
            rec = {"epoch": epoch_idx, "seconds": round(secs, 3), "samples": counter["samples"],
                   "batches": counter["batches"], "samples_per_s": round(counter["samples"] / secs, 1),
                   "loss_sum": total, "loss_mean": total / max(counter["batches"], 1),
                   "anomaly_detection": anomaly, "load_average": load_average()}
            epochs.append(rec)
            log(f"epoch {epoch_idx}: train {secs:.1f} s, {counter['samples']} samples in {counter['batches']} "
                f"batches, {rec['samples_per_s']:.0f} samples/s, loss {rec['loss_mean']:.4f}, "
                f"load {rec['load_average'][0]}")
            return loss

        def _valid_epoch(self, valid_data, show_progress=False):
            t = time.perf_counter()
            score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
            secs = time.perf_counter() - t
            epoch_idx = epochs[-1]["epoch"] if epochs else None
            evals.append({"epoch": epoch_idx, "seconds": round(secs, 3), "score": float(score),
                          "metrics": {k: float(v) for k, v in result.items()}})
            log(f"epoch {epoch_idx}: valid {secs:.1f} s, {config['valid_metric']} {float(score):.4f} | "
                + " ".join(f"{k} {float(v):.4f}" for k, v in result.items()))
            return score, result

        def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
            if load_best_model:
                checkpoint_file = model_file or self.saved_model_file
                checkpoint = torch.load(checkpoint_file, map_location=self.device, weights_only=False)
                self.model.load_state_dict(checkpoint["state_dict"])
                self.model.load_other_parameter(checkpoint.get("other_parameter"))
                self.loaded_checkpoint_epoch = checkpoint["epoch"]
                self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
            return super().evaluate(eval_data, load_best_model=False, model_file=None, show_progress=show_progress)

    trainer = PeerTrainer(config, model)
    log(f"SASRec: {n_params} parameters; threads {torch.get_num_threads()}; "
        f"anomaly detection {'ON (stock)' if torch.is_anomaly_enabled() else 'off'}; "
        f"malloc thresholds {'set' if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()) else 'unset'}; "
        f"load {load_average()}")

    t_fit = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=True, saved=True,
                                                      show_progress=False)
    fit_seconds = time.perf_counter() - t_fit
    t = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    test_seconds = time.perf_counter() - t
    best_epoch = getattr(trainer, "loaded_checkpoint_epoch", None)
    log(f"test at best validation epoch {best_epoch} ({test_seconds:.1f} s): "
        + " ".join(f"{k} {float(v):.4f}" for k, v in test_result.items()))

    secs = [e["seconds"] for e in epochs]
    after_first = secs[1:]
    samples_after_first = sum(e["samples"] for e in epochs[1:])
    mean_excl_first = (sum(after_first) / len(after_first)) if after_first else None
    result = {
        "peer": "RecBole SASRec",
        "dataset": args.dataset,
        "data_dir": data_dir,
        "inter_file": inter,
        "mode": "stock" if args.stock else "fair",
        "command": [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
        "started": started,
        "finished": now_utc(),
        "cammsr_git_commit": git_commit(),
        "data": {"users": n_users, "items": n_items, "interactions": n_inter,
                 "train_prefixes": len(train_data._dataset), "valid_users": len(valid_data._dataset),
                 "test_users": len(test_data._dataset), "load_and_split_seconds": round(data_seconds, 2)},
        "model": {"parameters": n_params, "trainable_parameters": n_trainable},
        "training": {
            "epochs_requested": args.epochs,
            "epochs_run": len(epochs),
            "max_train_batches": max_batches,
            "capped": bool(max_batches),
            "samples_per_epoch": epochs[0]["samples"] if epochs else None,
            "seconds_per_epoch": secs,
            "mean_seconds_per_epoch_excluding_first": round(mean_excl_first, 3) if after_first else None,
            "mean_seconds_per_epoch_all": round(sum(secs) / len(secs), 3) if secs else None,
            "samples_per_s_excluding_first": (round(samples_after_first / sum(after_first), 1)
                                              if after_first else None),
            "samples_per_s_all": (round(sum(e["samples"] for e in epochs) / sum(secs), 1) if secs else None),
            "note": (None if after_first else "one epoch only: the mean excluding the first is undefined; "
                     "use seconds_per_epoch[0] (includes first-epoch warm-up)"),
            "per_epoch": epochs,
            "fit_seconds_total": round(fit_seconds, 3),
        },
        "evaluation": {
            "valid_seconds_per_epoch": [e["seconds"] for e in evals],
            "valid_mean_seconds": round(sum(e["seconds"] for e in evals) / len(evals), 3) if evals else None,
            "test_seconds": round(test_seconds, 3),
            "per_epoch": evals,
        },
        "best_valid_epoch": best_epoch,
        "best_valid_score": float(best_valid_score) if best_valid_result is not None else None,
        "valid_metrics": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "test_metrics": {k: float(v) for k, v in test_result.items()},
        "fairness": {
            "mode": "stock" if args.stock else "fair",
            "anomaly_detection_enabled_by_recbole_import": anomaly_after_import and not anomaly_before_import,
            "anomaly_detection_during_training": sorted({e["anomaly_detection"] for e in epochs}),
            "anomaly_detection_disabled_by_runner": not args.stock,
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "checkpoint_load_weights_only_false": True,
            "statement": ("RecBole run as shipped (anomaly detection on, glibc malloc defaults)" if args.stock else
                          "RecBole at its best: torch anomaly detection (turned on process-wide by importing "
                          "RecBole's SINE model) turned off, and glibc MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_"
                          " = 1 GiB; neither changes any result (bit-identical), both only speed it up"),
        },
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "machine": {**describe_machine(), "load_average_start": load_at_start, "load_average_end": load_average(),
                    "date": started},
        "recbole_config": jsonable(dict(config.final_config_dict)),
        "config_overrides": overrides,
        "process_seconds": round(time.perf_counter() - t_process, 2),
    }
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)
    os.replace(out_path + ".tmp", out_path)
    log(f"wrote {out_path}")
    if not args.work_dir:
        os.chdir("/")
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
