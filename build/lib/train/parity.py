"""Parity check of a distributed setup: run a few training steps and dump what must not depend on the world size.

    python -m train.parity --data DIR --out FILE.pt --steps 3 [--stages 1,2,3] [key=value ...]
    torchrun --nproc_per_node 2 -m train.parity ...        (or any launcher in launch/)

For each ZeRO stage: validation/test metric sums before training (exact across world sizes), the global loss of
each step, the full ID table and every dense parameter after the steps. Compare two dumps with `compare`. The tests
use it to prove 1 process == N processes == N nodes on the same global batches (fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _dense_state(engine) -> dict[str, torch.Tensor]:
    params = dict(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone().reshape(-1) for n, p in params.items()}
    return {n: p.detach().float().clone().reshape(-1) for n, p in params.items()}


def run(data: str, steps: int, stages: list[int], overrides: list[str], run_root: Path) -> dict:
    from train.config import load_config
    from train.loop import Trainer

    results = {}
    for stage in stages:
        cfg = load_config(None, [f"data.path={data}", f"train.zero_stage={stage}", "logging.tensorboard=false",
                                 "checkpoint.enabled=false", "eval.test=never"] + overrides)
        trainer = Trainer(cfg, run_root / f"zero{stage}")
        before = {split: trainer.evaluate_split(split) for split in ("valid", "test")}
        losses = []
        for step, batch in trainer.plan.epoch_batches(0):
            if step >= steps:
                break
            terms, _, _ = trainer.train_step(batch)
            trainer.state["global_step"] += 1  # as the training loop does (the sampled softmax draws by step)
            value = terms.total.detach().double().reshape(1)
            if trainer.env.world_size > 1:
                dist.all_reduce(value)
            losses.append(float(value) / trainer.env.world_size)
        results[stage] = {"metrics_before": before, "losses": losses, "table": trainer.table.all_rows(),
                          "dense": _dense_state(trainer.engine), "world_size": trainer.env.world_size}
        trainer.release()
    return results


def compare(a: dict, b: dict, tol: float) -> list[str]:
    """Differences beyond `tol` between two dumps (empty when they match)."""
    problems = []
    for stage in a:
        x, y = a[stage], b[stage]
        if x["metrics_before"] != y["metrics_before"]:
            problems.append(f"zero {stage}: metrics differ {x['metrics_before']} vs {y['metrics_before']}")
        if len(x["losses"]) != len(y["losses"]) or any(abs(p - q) > tol for p, q in zip(x["losses"], y["losses"])):
            problems.append(f"zero {stage}: losses {x['losses']} vs {y['losses']}")
        diff = (x["table"] - y["table"]).abs().max().item()
        if diff > tol:
            problems.append(f"zero {stage}: ID table differs by {diff}")
        for name in x["dense"]:
            diff = (x["dense"][name] - y["dense"][name]).abs().max().item()
            if diff > tol:
                problems.append(f"zero {stage}: {name} differs by {diff}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    results = run(args.data, args.steps, [int(s) for s in args.stages.split(",")], args.overrides,
                  args.out.parent / (args.out.stem + "-runs"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, args.out)
        print(f"parity dump: {args.out} (world size {next(iter(results.values()))['world_size']})")
    from train.distributed import shutdown
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
