"""Real multi-process runs on CPU (gloo, no mocks): 1 process == 2 processes == 2 nodes on the same global batches,
exact distributed evaluation, kill + resume == uninterrupted, a dead or interrupted rank ends the job quickly,
TensorBoard tags, the progress bar."""
import json
import os
import re
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch

from conftest import PY, ROOT, cpu_env, kill_after_first_checkpoint, write_tiny_dataset
from data_shards.reader import PreparedDataset
from train.parity import compare

# Tiny CAMMSR, fp32, no dropout, deterministic modality swap (prob 1): every random draw is rank-independent.
# Adam eps 1e-3: the attention key bias has an exactly-zero true gradient (softmax shift invariance); with a tiny eps
# Adam turns its float-rounding noise into lr-sized steps that differ with the summation order.
TINY = ["train.precision=fp32", "train.eps=0.001", "model.hidden_size=8", "model.max_seq_len=6",
        "model.num_layers=1", "model.num_heads=1", "model.num_experts=2", "model.ffn_inner_size=16",
        "model.hidden_dropout=0.0", "model.attn_dropout=0.0", "model.mscl_swap_prob=1.0", "train.batch_size=64",
        "data.build_features=false"]  # the fixture's random stores are used as they are


def _env():
    return cpu_env()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """81 users (not divisible by 2), 60 items, 3-level categories, random text/image feature stores."""
    out = write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")
    assert PreparedDataset(out).num_users % 2 == 1
    return out


def _run(cmd, timeout=240, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "one.pt"
    _run([PY, "-m", "train.parity", "--data", str(dataset), "--out", str(out), "--steps", "3", *TINY])
    return torch.load(out, weights_only=False)


def test_two_processes_equal_one_process_zero_1_2_3(dataset, reference, tmp_path):
    """Same global batches: losses, ID table and dense weights within 1e-5, validation/test metrics identical
    (81 users over 2 ranks: exact sum and count, no padded duplicates)."""
    out = tmp_path / "two.pt"
    _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", "2", "--python", PY, "--module", "train.parity", "--",
          "--data", str(dataset), "--out", str(out), "--steps", "3", *TINY])
    two = torch.load(out, weights_only=False)
    assert set(two) == {1, 2, 3} and two[1]["world_size"] == 2
    assert compare(reference, two, 1e-5) == []
    for stage in two:
        assert two[stage]["metrics_before"] == reference[stage]["metrics_before"]  # exact
        assert two[stage]["metrics_before"]["valid"]["count"] == 81


def test_two_nodes_rendezvous_match(dataset, reference, tmp_path):
    """2 nodes x 1 process on localhost through the torchrun c10d rendezvous (launch/multi_node.sh)."""
    out = tmp_path / "nodes.pt"
    port = _port()
    cmds = [[str(ROOT / "launch" / "multi_node.sh"), "--nnodes", "2", "--nproc", "1", "--rdzv", f"127.0.0.1:{port}",
             "--node-rank", str(rank), "--job-id", "test", "--python", PY, "--module", "train.parity", "--",
             "--data", str(dataset), "--out", str(out), "--steps", "3", "--stages", "2", *TINY] for rank in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    nodes = torch.load(out, weights_only=False)
    assert nodes[2]["world_size"] == 2
    assert compare({2: reference[2]}, nodes, 1e-5) == []


_GROUPS_FREED = """
import gc, sys, weakref
from pathlib import Path
from torch.distributed import distributed_c10d
from train.distributed import shutdown
from train.parity import run
run(sys.argv[1], 2, [0, 2], sys.argv[3:], Path(sys.argv[2]))
default = distributed_c10d._get_default_group()
groups = [weakref.ref(group) for group in distributed_c10d._world.pg_map if group is not default]
del default
shutdown()
gc.collect()
# one write per rank (print writes the text and the newline apart, and the two ranks share the pipe)
sys.stdout.write(f"GROUPS {len(groups)} ALIVE {sum(ref() is not None for ref in groups)}\\n")
sys.stdout.flush()
"""


def test_deepspeed_process_groups_are_freed_before_the_interpreter_exits(dataset, tmp_path):
    """A Gloo group's worker threads stop only in its destructor; alive at finalization, one of them can abort the
    process after a good run (train.distributed._release_process_groups). After Trainer.release and shutdown, the
    groups DeepSpeed made (ZeRO 0 and 2) must be unreferenced. The default group stays: torch itself holds it, the
    at-exit pause covers its threads."""
    driver = tmp_path / "groups_freed.py"
    driver.write_text(_GROUPS_FREED)
    proc = _run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
                 str(driver), str(dataset), str(tmp_path / "runs"), *TINY])
    counts = [line.split() for line in proc.stdout.splitlines() if line.startswith("GROUPS")]
    assert len(counts) == 2, proc.stdout[-3000:]
    for _, groups, _, alive in counts:
        assert int(groups) >= 1 and int(alive) == 0


_GROUPS_IN_SEQUENCE = """
import os
from train.distributed import init_distributed, shutdown
keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
before = {key: os.environ.get(key) for key in keys}
ports = []
for _ in range(2):
    env = init_distributed(30.0)
    assert env.world_size == 1
    ports.append(os.environ["MASTER_PORT"])
    assert init_distributed(30.0).rank == 0  # reused, not a second group
    shutdown()
    assert {key: os.environ.get(key) for key in keys} == before, os.environ
print("PORTS", *ports)
"""


def test_a_closed_group_takes_its_rendezvous_variables_with_it(tmp_path):
    """One process, two groups one after the other (a tune worker's trials; recommend inside a benchmark): each
    shutdown puts back the variables init_distributed found, so the next group, or a process started afterwards,
    picks a free port of its own instead of this group's. Variables a launcher set are kept."""
    driver = tmp_path / "groups_in_sequence.py"
    driver.write_text(_GROUPS_IN_SEQUENCE)
    proc = _run([PY, str(driver)])
    ports = next(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PORTS"))
    assert len(ports) == 2
    launched = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", WORLD_SIZE="1")
    proc = subprocess.run([PY, str(driver)], cwd=ROOT, env=launched, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PORTS " + " ".join([launched["MASTER_PORT"]] * 2) in proc.stdout


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_other_launchers_match(dataset, reference, tmp_path, launcher):
    """The deepspeed launcher and accelerate launch run the same entry point with the same result."""
    out = tmp_path / f"{launcher}.pt"
    script = "deepspeed_hostfile.sh" if launcher == "deepspeed" else "accelerate.sh"
    _run([str(ROOT / "launch" / script), "--nproc", "2", "--port", str(_port()), "--module", "train.parity", "--",
          "--data", str(dataset), "--out", str(out), "--steps", "3", "--stages", "1", *TINY])
    got = torch.load(out, weights_only=False)
    assert got[1]["world_size"] == 2
    assert compare({1: reference[1]}, got, 1e-5) == []


def test_torch_backend_matches_torchrec(dataset, reference, tmp_path):
    """The plain-torch table (chosen explicitly, one process) runs the same sparse maths as TorchRec's kernels."""
    out = tmp_path / "torch.pt"
    _run([PY, "-m", "train.parity", "--data", str(dataset), "--out", str(out), "--steps", "3", "--stages", "1",
          *TINY, "embedding.backend=torch"])
    assert compare({1: reference[1]}, torch.load(out, weights_only=False), 1e-5) == []


@pytest.mark.parametrize("anchors, stages", [("last", "0,1"), ("every_prefix", "1")])
def test_all_positions_mode_two_processes_equal_one(dataset, tmp_path, anchors, stages):
    """The all-positions (causal) training mode in batches of targets: same global-batch equivalence, causal
    router; at ZeRO 0 (one process skips the engine's gradient all-reduce, two run it) and 1; MSCL anchors at each
    window's end or at every prefix, with negatives from the global batch either way."""
    mode = [*TINY, "train.batch_size=48", "train.batch_unit=targets", "model.sequence_mode=all_positions",
            "model.router_causal=true", f"model.mscl_anchors={anchors}"]
    dumps = {}
    for nproc in (1, 2):
        out = tmp_path / f"ap{nproc}.pt"
        _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY, "--module",
              "train.parity", "--", "--data", str(dataset), "--out", str(out), "--steps", "3", "--stages", stages,
              *mode])
        dumps[nproc] = torch.load(out, weights_only=False)
    assert compare(dumps[1], dumps[2], 1e-5) == []


# One ID warm-up step (the content pathways get no gradient) then one step of the whole model, through DeepSpeed's
# own gradient all-reduce (forced on) and through the single-process skip: the largest dense-parameter difference.
_SKIP_EQUALS_ALLREDUCE = """
import sys
from pathlib import Path
from train.config import load_config
from train.loop import Trainer
cfg = load_config(None, ["data.path=" + sys.argv[1], "logging.tensorboard=false", "checkpoint.enabled=false",
                         "eval.test=never", "train.zero_stage=0", "train.id_warmup_epochs=1", *sys.argv[3:]])
dense = {}
for allreduce in (True, False):
    trainer = Trainer(cfg, Path(sys.argv[2]) / str(allreduce))
    assert trainer.env.world_size == 1 and not trainer.engine.enable_backward_allreduce
    trainer.engine.enable_backward_allreduce = allreduce
    for epoch in (0, 1):
        trainer.set_id_warmup(epoch)
        trainer.train_step(next(trainer.plan.epoch_batches(epoch))[1])
    dense[allreduce] = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.release()
print("RESULT", max((dense[True][n] - dense[False][n]).abs().max().item() for n in dense[True]))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_process_skipping_the_gradient_all_reduce_trains_as_deepspeed_does(dataset, tmp_path, precision):
    """Bit-identical dense weights after an ID warm-up step and a full step: the content parameters that got no
    gradient in warm-up are stepped with zeros as DeepSpeed's all-reduce path does (Adam's step count included);
    bf16 goes through DeepSpeed's bf16 optimizer wrapper."""
    proc = _run([PY, "-c", _SKIP_EQUALS_ALLREDUCE, str(dataset), str(tmp_path), *TINY, "train.batch_size=16",
                 f"train.precision={precision}"])
    assert float(proc.stdout.split("RESULT ", 1)[1].split()[0]) == 0.0


TRAIN = ["model.hidden_size=8", "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1",
         "model.num_experts=2", "model.ffn_inner_size=16", "train.batch_size=128", "train.precision=fp32",
         "logging.every_steps=2", "max_epochs=4", "eval.patience=0"]


def _train_cmd(dataset, run_dir, *extra, resume=False):
    return [PY, "-m", "train.command", "--data", str(dataset), "--run-dir", str(run_dir),
            *(["--resume"] if resume else []), *TRAIN, *extra]


def test_kill_resume_equals_uninterrupted_and_tensorboard_tags(dataset, tmp_path):
    full = tmp_path / "full"
    trained = _run(_train_cmd(dataset, full))
    for bar in ("epoch 0:", "step/s]", "valid:", "test:"):  # the progress bars of training and evaluation
        assert bar in trained.stderr, trained.stderr[-2000:]
    metrics = json.loads((full / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"ndcg@5", "ndcg@10", "mrr@5", "mrr@10", "recall@5", "recall@10"}
    assert "ndcg@10" in metrics["valid"] and (full / "config.yaml").is_file()

    # TensorBoard: the promised tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(full / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars, histograms = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    for tag in ["train/loss/total", "train/loss/recommendation", "train/loss/mscl", "train/loss/category",
                "train/lr", "perf/samples_per_s", "perf/tokens_per_s", "memory/rss_mb", "valid/ndcg@10",
                "test/ndcg@10", "valid/mrr@5", "cammsr/modality_weight/id", "cammsr/modality_weight/image",
                "cammsr/expert_usage/text/expert0"]:
        assert tag in scalars, (tag, sorted(scalars)[:40])
    assert "cammsr/modality_weight/by_category/text" in histograms
    assert any(t.startswith("config") for t in acc.Tags()["tensors"])

    # the run's report is drawn from those events: three real PNG plots
    from PIL import Image
    from train.report import write_report
    plots = write_report(full)
    assert [p.name for p in plots] == ["training_curves.png", "modality_weights_by_category.png",
                                       "expert_usage.png"]
    for plot in plots:
        with Image.open(plot) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200

    # a run killed (SIGKILL) after its first checkpoint, then resumed, ends with the same metrics
    killed = tmp_path / "killed"
    # (mid-epoch checkpoints too: the data position is a step inside an epoch; checkpointing is not in the maths)
    kill_after_first_checkpoint(_train_cmd(dataset, killed, "checkpoint.every_steps=3"), killed)
    first = json.loads((killed / "checkpoints" / "latest").read_text())["tag"]
    # a different config cannot resume this run
    bad = subprocess.run(_train_cmd(dataset, killed, "train.lr=0.01", resume=True), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "train.lr" in bad.stderr, bad.stderr[-2000:]
    # without --resume the run dir is not overwritten
    again = subprocess.run(_train_cmd(dataset, killed), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _run(_train_cmd(dataset, killed, "checkpoint.every_steps=3", resume=True))
    assert "resumed from" in resumed.stdout
    after = json.loads((killed / "metrics.json").read_text())
    assert first.startswith("ep")
    assert after["valid"] == metrics["valid"] and after["test"] == metrics["test"]
    assert after["best_epoch"] == metrics["best_epoch"]

    # test is ranked once, after training, with the best checkpoint: what the per-improvement option
    # (eval.test=each_best) reads during training with the weights of then; the logs show validation only
    assert all("test" not in r for r in metrics["history"]) and metrics["best_epoch"] < metrics["epochs_run"] - 1
    lines = trained.stdout.splitlines()
    ending = next(i for i, line in enumerate(lines) if line.startswith("test at the best validation epoch"))
    assert not any(re.search(r"\btest\b", line) for line in lines[:ending]), trained.stdout
    each = _run(_train_cmd(dataset, tmp_path / "each", "eval.test=each_best"))
    each_metrics = json.loads((tmp_path / "each" / "metrics.json").read_text())
    assert each_metrics["test"] == metrics["test"] and each_metrics["valid"] == metrics["valid"]
    best = next(r for r in each_metrics["history"] if r["epoch"] == each_metrics["best_epoch"])
    assert best["test"] == metrics["test"] and "test at the best" not in each.stdout


def _signal_rank_one_while_training(dataset, run_dir, sig, timeout_s: float) -> tuple[int, str, float]:
    """Start a 2-rank job, send `sig` to rank 1 once training has checkpointed, and wait for the whole job:
    (exit code, output, seconds from the signal to the job's end)."""
    cmd = [str(ROOT / "launch" / "single_node.sh"), "--nproc", "2", "--python", PY, "--",
           "--data", str(dataset), "--run-dir", str(run_dir), *TRAIN, "max_epochs=1000",
           f"distributed.timeout_s={timeout_s}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "the job ended before training"
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "train.command" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
    assert workers, "rank 1 not found"
    workers[0].send_signal(sig)
    signalled_at = time.time()
    try:
        output, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output, time.time() - signalled_at


def test_dead_rank_fails_the_job_quickly(dataset, tmp_path):
    code, output, seconds = _signal_rank_one_while_training(dataset, tmp_path / "dead", signal.SIGKILL, timeout_s=30)
    assert code != 0 and seconds < 90
    assert "rank" in output.lower() and ("failed" in output.lower() or "error" in output.lower())


def test_interrupted_rank_ends_the_job_without_waiting_for_the_collective_timeout(dataset, tmp_path):
    """Ctrl-C (SIGINT) reaching one rank: it must leave at once, not wait in a shutdown barrier that its peers,
    stuck in a training collective, never join (that waited for distributed.timeout_s, here 120 s)."""
    code, output, seconds = _signal_rank_one_while_training(dataset, tmp_path / "interrupted", signal.SIGINT,
                                                            timeout_s=120)
    assert code != 0 and seconds < 60, output[-3000:]
    assert "cammsr train: interrupted" in output and "--resume" in output


def test_id_warmup_epochs_train_ids_alone_and_never_select_the_best_epoch(dataset, tmp_path):
    run = tmp_path / "warm"
    out = _run(_train_cmd(dataset, run, "train.id_warmup_epochs=2", "checkpoint.keep=10")).stdout
    assert "epoch 0: ID warm-up" in out and "epoch 2: every modality from now on" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert [bool(r.get("id_warmup")) for r in metrics["history"]] == [True, True, False, False]
    assert metrics["best_epoch"] >= 2 and metrics["epochs_run"] == 4
    best = next(r for r in metrics["history"] if r["epoch"] == metrics["best_epoch"])
    assert best["valid"] == metrics["valid"] and metrics["test"]["count"] == metrics["valid"]["count"]
    assert all("test" not in r for r in metrics["history"])  # test is ranked once, after training
    warm = [r for r in metrics["history"] if r.get("id_warmup")]
    # without the warm-up rounds' validation (they select nothing): the same result, their rounds left out
    _run(_train_cmd(dataset, tmp_path / "unvalidated", "train.id_warmup_epochs=2", "eval.in_warmup=false"))
    unvalidated = json.loads((tmp_path / "unvalidated" / "metrics.json").read_text())
    assert [r["valid"] for r in unvalidated["history"]] == [r["valid"] for r in metrics["history"][2:]]
    assert unvalidated["test"] == metrics["test"] and unvalidated["best_epoch"] == metrics["best_epoch"]
    # a warm-up checkpoint recommends as it was trained and validated: with the ID pathway alone
    from benchmarks.per_user import ndcg_at_10_per_user, split_histories, user_vectors_after
    from train.recommend import RunRecommender
    histories, targets = split_histories([s.items for s in PreparedDataset(dataset).user_sequences()], "valid")
    for tag, record in (("ep0001-st0000000", warm[0]), ("best", best)):
        recommender = RunRecommender(run, checkpoint=tag)
        assert recommender.model.id_only == bool(record.get("id_warmup"))
        scores = user_vectors_after(recommender, histories).flatten(1) @ recommender.candidates[1:].flatten(1).T
        assert float(ndcg_at_10_per_user(scores, targets).mean()) == pytest.approx(record["valid"]["ndcg@10"],
                                                                                  abs=1e-6)

