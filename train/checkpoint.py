"""Run state that survives a restart, written atomically.

RUN/checkpoints/<tag>/
  sparse/            the ID table and its optimizer state (torch.distributed.checkpoint: each rank its shards)
  engine/            DeepSpeed state (dense weights, optimizer, ZeRO partitions, LR schedule)
  rng-rank<r>.pt     RNG states of every rank (torch, cuda, numpy, python)
  trainer.json       data position (epoch, step), early-stopping state, config + dataset fingerprints
RUN/checkpoints/latest   {"tag": ...}: written last (tmp file + rename) after every rank finished; a tag folder that
                         `latest` does not name is an interrupted write and is ignored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from train.config import Config, ConfigError

LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose value differs between a checkpoint's config and this one. A key the checkpoint predates counts as
    unchanged while it holds its default: a new key's default is the behaviour from before it existed."""
    return _diff(saved, current, Config().to_dict())


def _diff(saved: dict, current: dict, defaults: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, defaults.get(key, {}), f"{prefix}{key}.")
        elif a != b and not (key not in saved and key in defaults and b == defaults[key]):
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep = rank, keep

    def latest_tag(self) -> str | None:
        try:
            return json.loads((self.root / LATEST).read_text())["tag"]
        except (OSError, ValueError, KeyError):
            return None

    def save(self, tag: str, table, engine, trainer_state: dict, best_tag: str | None) -> None:
        folder = self.root / tag
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        _barrier()
        dcp.save({"sparse": table.sharded_state()}, checkpoint_id=str(folder / "sparse"))
        # frozen parameters (a pretrained encoder's backbone) come from their own files, not from the checkpoint
        engine.save_checkpoint(str(folder / "engine"), tag="state", save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), folder / f"rng-rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            atomic_write_text(folder / "trainer.json", json.dumps(trainer_state, indent=1, sort_keys=True))
            atomic_write_text(self.root / LATEST, json.dumps({"tag": tag}))
            self._prune(keep={tag, best_tag})
        _barrier()

    def _prune(self, keep: set) -> None:
        tags = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("ep"))
        recent = set(tags[-self.keep:])
        for name in tags:
            if name not in recent and name not in keep:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def load(self, table, engine, config_tree: dict, config_fp: str, data_fp: str) -> dict:
        """Restore the latest complete checkpoint; refuses one from another config or dataset."""
        tag = self.latest_tag()
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.root} (no '{LATEST}' pointer)")
        folder = self.root / tag
        state = json.loads((folder / "trainer.json").read_text())
        if state["data_fingerprint"] != data_fp:
            raise ConfigError(f"--resume: checkpoint {folder} was written for a different dataset "
                              f"(dataset fingerprint {state['data_fingerprint']}, this dataset {data_fp})")
        changed = config_changes(state["config"], config_tree) if state["config_fingerprint"] != config_fp else []
        if changed:
            raise ConfigError(f"--resume: checkpoint {folder} was written with a different config "
                              f"(fingerprint {state['config_fingerprint']} vs {config_fp}); changed keys: "
                              + "; ".join(changed[:10]))
        if state["world_size"] != (dist.get_world_size() if dist.is_initialized() else 1):
            raise ConfigError(f"--resume: checkpoint {folder} was written by {state['world_size']} processes; "
                              "resume with the same number")
        sparse = {"sparse": table.sharded_state()}
        dcp.load(sparse, checkpoint_id=str(folder / "sparse"))
        table.load_sharded_state(sparse["sparse"])
        self._load_engine(folder, engine)
        set_rng_state(torch.load(folder / f"rng-rank{self.rank}.pt", weights_only=False))
        state["tag"] = tag
        return state

    def load_weights(self, tag: str, table, engine) -> None:
        """The weights of checkpoint `tag` of this run, to score with (the ID table's optimizer state stays as
        it is; the engine's is read too, as DeepSpeed loads a checkpoint whole)."""
        folder = self.root / tag
        sparse = {"sparse": table.weight_state()}
        dcp.load(sparse, checkpoint_id=str(folder / "sparse"))
        table.load_weight_state(sparse["sparse"])
        self._load_engine(folder, engine)

    @staticmethod
    def _load_engine(folder: Path, engine) -> None:
        frozen = [name for name, param in engine.module.named_parameters() if not param.requires_grad]
        engine.load_checkpoint(str(folder / "engine"), tag="state", load_optimizer_states=True,
                               load_lr_scheduler_states=True, load_module_strict=not frozen)
