"""Operator dispatches per training step, by phase and by model part: a CPU-side count of what a GPU step launches.

    python -m benchmarks.step_ops --data data/beauty --config configs/beauty.yaml model.name=sasrec
    python -m benchmarks.step_ops --data data/beauty --config configs/beauty.yaml          # the config's model

Each top-level aten op that a step dispatches costs the host one dispatch; all but the view ops (reshape, t,
transpose..., counted apart) also launch at least one kernel on a GPU. A model as small as the paper's (d=64,
2 layers) does little arithmetic per op, so on a GPU its step time is about (ops per step) x (host cost per op)
rather than FLOPs / peak: this count is what to cut (fusion, torch.compile, CUDA graphs) to make a GPU epoch
shorter. The trainer's own step runs (same batches, model, DeepSpeed engine and ID table) on this machine.

It also times the step unprofiled (wall milliseconds, the device synchronised only after the last step) and, on a
GPU, sums the step's kernel time: a step whose kernels keep the GPU busy for a small part of its wall time is bound
by the host, which is what the op count measures.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import time

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from benchmarks.machine import describe_machine
from benchmarks.scratch_trainer import add_config_arguments, scratch_trainer
from launch.arguments import parse_with_overrides
from train.engine import backward_pass

PART_PREFIX = "part:"
# ops that only make a new view of a tensor's memory (no kernel; reshape copies only when it must)
VIEW_OPS = {f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "squeeze", "unsqueeze",
    "expand", "detach", "alias", "select", "slice", "narrow", "split", "split_with_sizes", "unbind", "as_strided",
    "view_as", "flatten", "unflatten", "chunk", "diagonal")}


def _top_level_ops(prof) -> list:
    """aten ops not nested in another aten op: one dispatch each (nested ones are their implementation)."""
    events = prof.events()
    return [e for e in events if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]


def _part_of(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PART_PREFIX):
            return parent.name[len(PART_PREFIX):]
        parent = parent.cpu_parent
    return "(outside the model's children: inputs, loss)"


def _label_children(model: torch.nn.Module) -> None:
    """Wrap each direct child's forward (each member's, for a ModuleList / ModuleDict, which has no forward) in a
    named profiler range, so forward ops can be attributed to it."""
    for name, child in model.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            members = [(f"{name}.{key}", member) for key, member in child.named_children()]
        else:
            members = [(name, child)]
        for member_name, member in members:
            _label(member_name, member)


def _label(name: str, module: torch.nn.Module) -> None:
    def enter(module, args):
        module.__dict__["_ops_range"] = record_function(PART_PREFIX + name).__enter__()

    def leave(module, args, output):
        module.__dict__.pop("_ops_range").__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def count_step_ops(trainer, steps: int, warmup: int) -> dict:
    """Mean top-level ops per step for forward, backward, optimizer, and forward ops per model child."""
    _label_children(trainer.model)
    batches = trainer.plan.epoch_batches(0, 0)
    for _ in range(warmup):
        trainer.train_step(next(batches)[1])
    phases, parts, names = collections.Counter(), collections.Counter(), collections.Counter()
    views = 0
    for _ in range(steps):
        batch = next(batches)[1].to(trainer.env.device)
        with profile(activities=[ProfilerActivity.CPU]) as forward:
            terms, _ = trainer.losses(batch)
        with profile(activities=[ProfilerActivity.CPU]) as backward:
            backward_pass(trainer.engine, terms.total)
        with profile(activities=[ProfilerActivity.CPU]) as optimizer:
            trainer.engine.step()
            trainer.table.step()
        for phase, prof in (("forward", forward), ("backward", backward), ("optimizer", optimizer)):
            ops = _top_level_ops(prof)
            phases[phase] += len(ops)
            names.update(e.name for e in ops)
            views += sum(e.name in VIEW_OPS for e in ops)
            if phase == "forward":
                parts.update(_part_of(e) for e in ops)
    mean = lambda counter: {k: v / steps for k, v in counter.most_common()}  # noqa: E731
    return {"phases": mean(phases), "views": views / steps, "forward_parts": mean(parts),
            "top_ops": dict(list(mean(names).items())[:8])}


def time_steps(trainer, steps: int) -> dict:
    """Mean wall ms per unprofiled training step and, on a GPU, mean kernel ms per step (from a profiled pass)."""
    on_gpu = trainer.env.device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    batches = itertools.chain.from_iterable(trainer.plan.epoch_batches(epoch, 0) for epoch in itertools.count())
    trainer.train_step(next(batches)[1])
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches)[1])
    synchronize()
    timing = {"step_ms": (time.perf_counter() - start) * 1e3 / steps, "kernel_ms": None}
    if on_gpu:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                trainer.train_step(next(batches)[1])
            synchronize()
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        timing["kernel_ms"] = kernel_us / 1e3 / steps
    return timing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (mean reported)")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first")
    parser.add_argument("--timed-steps", type=int, default=20, help="unprofiled steps timed after the count")
    args = parse_with_overrides(parser, argv)
    machine = describe_machine()
    print(f"machine: {machine['cpu']}, gpu {machine['gpu']}, torch {machine['torch']}, {machine['date']}")
    with scratch_trainer(args) as trainer:
        result = count_step_ops(trainer, args.steps, args.warmup)
        timing = time_steps(trainer, args.timed_steps)
    model = trainer.cfg.model
    total = sum(result["phases"].values())
    print(f"\n{model.name} (modalities {'+'.join(model.modalities) if model.name == 'cammsr' else 'id'}): "
          f"{total:,.0f} top-level aten ops per training step (mean of {args.steps}; "
          f"{trainer.plan.steps_per_epoch} steps per epoch)")
    for phase, count in result["phases"].items():
        print(f"  {phase:<10} {count:8,.0f}")
    print(f"  of all these, views (host time, no kernel): {result['views']:,.0f}")
    print("  forward, by model part:")
    for part, count in result["forward_parts"].items():
        print(f"    {part:<48} {count:8,.0f}")
    print("  most frequent: " + ", ".join(f"{k} {v:,.0f}" for k, v in result["top_ops"].items()))
    line = f"step time: {timing['step_ms']:.1f} ms wall (mean of {args.timed_steps} unprofiled steps)"
    if timing["kernel_ms"] is not None:
        busy = timing["kernel_ms"] / timing["step_ms"]
        line += f"; GPU kernels {timing['kernel_ms']:.1f} ms per step (busy {busy:.0%} of the wall time)"
    print(line)

if __name__ == "__main__":
    main()
