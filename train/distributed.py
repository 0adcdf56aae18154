"""Process group from the launcher's environment (torchrun, deepspeed, accelerate, SLURM, or none).

Device: cuda:<local rank> when torch.cuda.is_available(), else CPU (never read CUDA_VISIBLE_DEVICES, which the
deepspeed launcher sets even on CPU machines). Backend: nccl on GPU, gloo on CPU. Collectives time out after
`timeout_s`, so a dead peer fails the job instead of hanging it.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
    if not nodes:
        return "127.0.0.1"
    first = nodes.split(",")[0]
    if "[" in first:  # node[01-04] -> node01
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def read_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/deepspeed/accelerate (RANK...) or SLURM (SLURM_PROCID...)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return (_env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1),
                _env_int("LOCAL_RANK", default=0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = _env_int("SLURM_PROCID", default=0), _env_int("SLURM_NTASKS", default=1)
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        os.environ["LOCAL_RANK"] = str(_env_int("SLURM_LOCALID", default=0))
        return rank, world, _env_int("SLURM_LOCALID", default=0)
    return 0, 1, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
# The rendezvous variables as they were before this process made its group; `shutdown` puts them back.
_rendezvous_before: dict[str, str | None] | None = None


def init_distributed(timeout_s: float = 120.0, backend: str = "auto") -> DistEnv:
    """Initialise (or reuse) the default process group; a single process gets a world of one."""
    global _rendezvous_before
    if not dist.is_initialized():
        _rendezvous_before = {key: os.environ.get(key) for key in _RENDEZVOUS_KEYS}
    rank, world, local_rank = read_env()
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
        atexit.unregister(_let_gloo_workers_finish)  # once, however often a group is made
        atexit.register(_let_gloo_workers_finish)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, backend=dist.get_backend())


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group. After an error or an interrupt, do not wait for the peers: they may be inside a
    training collective that this rank will never join, and a barrier would hold every rank until the timeout."""
    if dist.is_initialized():
        try:
            if wait_for_peers:
                dist.barrier()
        finally:
            _release_process_groups()
            _restore_rendezvous()


def _restore_rendezvous() -> None:
    """Put back the rendezvous variables `init_distributed` found: the group's address and port leave with it, so a
    process started afterwards (a benchmark's next `cammsr train`, the next trial's group) does not try to listen
    on this group's port."""
    global _rendezvous_before
    if _rendezvous_before is None:
        return
    for key, value in _rendezvous_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _rendezvous_before = None


def _release_process_groups() -> None:
    """Destroy the groups and drop DeepSpeed's cached references to them.

    Why it matters: a Gloo worker thread lets go of each finished collective only after the caller has moved on, and
    letting go can need the GIL (the collective's tensors may own Python objects). If the interpreter is finalizing
    by then, Python ends that thread inside a C++ destructor: std::terminate, SIGABRT, a failed job after a good run
    (seen in CI on the 2-node test; a core dump shows ProcessGroupGloo::runLoop -> ~AsyncAllgatherWork -> take_gil
    -> pthread_exit). destroy_process_group leaves the worker threads running; only a group's destructor joins them,
    and it runs when the last reference goes. So: release DeepSpeed's references here, the engine's grad hooks in
    Trainer.release (they make the engine uncollectable), and collect at exit, before finalization
    (_let_gloo_workers_finish).
    """
    import deepspeed.comm
    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _let_gloo_workers_finish() -> None:
    """At exit, while the interpreter is still whole (atexit): free the released groups, whose destructors join their
    worker threads. Some groups stay referenced to the end (torch keeps the default one from C++; ZeRO-3 keeps its
    engine through two DeepSpeed 0.19.8 module-level references: parameter_offload.FWD_MODULE_STACK, never popped,
    and an lru_cache on PartitionedParameterCoordinator.__params_to_release): a pause with the GIL released lets their
    threads drop their last finished work first."""
    gc.collect()
    time.sleep(0.1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
