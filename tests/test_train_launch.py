"""Launch scripts: each dry run prints the exact command it would run (nothing is started)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--data", "data/x", "--config", "configs/ml100k.yaml", "--run-dir", "runs/x", "model=sasrec"]


def _dry(*args, env=None) -> str:
    proc = subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DS_ACCELERATOR="cpu", **(env or {})))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_single_node_dry_run():
    out = _dry(str(ROOT / "launch" / "single_node.sh"), "--nproc", "4", "--dry-run", "--", *TRAIN)
    assert "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 4 -m train.command" in out
    assert "model=sasrec" in out and "configs/ml100k.yaml" in out


def test_multi_node_dry_run():
    out = _dry(str(ROOT / "launch" / "multi_node.sh"), "--nnodes", "2", "--nproc", "8", "--rdzv", "node0:29400",
               "--node-rank", "1", "--dry-run", "--", *TRAIN)
    assert "--nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29400" in out
    assert "--node_rank 1 -m train.command" in out


def test_deepspeed_hostfile_dry_run(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# comment\nworker-1 slots=8\nworker-2 slots=8\n")
    out = _dry(str(ROOT / "launch" / "deepspeed_hostfile.sh"), "--hostfile", str(hostfile), "--dry-run", "--", *TRAIN)
    assert f"--hostfile {hostfile} --master_addr worker-1 --master_port 29500 --no_local_rank" in out
    assert "--module train.command" in out


def test_accelerate_and_slurm_dry_run():
    out = _dry(str(ROOT / "launch" / "accelerate.sh"), "--nproc", "2", "--nnodes", "2", "--node-rank", "1",
               "--master", "node0", "--dry-run", "--", *TRAIN)
    assert "launch --multi_gpu --num_processes 4 --num_machines 2 --machine_rank 1 --main_process_ip node0" in out
    out = _dry("bash", str(ROOT / "launch" / "slurm.sbatch"), *TRAIN,
               env={"DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "3", "NPROC_PER_NODE": "4", "SLURM_JOB_ID": "77"})
    assert "srun --ntasks-per-node=1" in out and "multi_node.sh --nnodes 3 --nproc 4" in out
    assert "--job-id 77" in out and "model=sasrec" in out


def test_bad_option_is_refused():
    proc = subprocess.run([str(ROOT / "launch" / "single_node.sh"), "--nprocs", "2"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown option --nprocs" in proc.stderr
