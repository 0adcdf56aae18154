"""Feature modes side by side in one run: training steps of the same config and data in each mode, each mode in a
process of its own (so its peak memory is its own), timed step by step; then where stream mode's step time goes.

    python -m benchmarks.stream_benchmark --data data/quickstart --config configs/quickstart.yaml --steps 12 \\
        [--modes cached,stream_inline,stream] [--record ID] [key=value ...]

Modes: `cached` (the feature store; built first when missing, not timed), `stream_inline` (features.mode=stream,
features.prefetch=0: read, decode and tokenize in the step, so the phases add up to the step), `stream`
(features.prefetch=1: those phases overlap the previous step in a thread), and the trainable encoders:
`top_layers`, `lora` (stream mode, the encoders train) and `side_adapter` (cached mode, a side network over per-layer
states encoded once; that encoding is not timed). The first --warmup steps of each mode are not timed. An epoch's
time is extrapolated from the timed steps (steps/epoch x mean step time); one validation round is timed as well
(stream mode encodes the catalogue in it). Every mode trains with model.loss_type=sampled_softmax (what stream mode
and trained encoders need; train.num_negatives from the config or the overrides). `prepare_only` times the media path
of stream mode alone (the steps' items read, decoded and tokenized, nothing encoded or trained): images/s through
the decoder over --prepare-steps steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = {"cached": ["features.mode=cached"],
         "stream_inline": ["features.mode=stream", "features.prefetch=0"],
         "stream": ["features.mode=stream", "features.prefetch=1"],
         "top_layers": ["features.mode=stream", "features.tune=top_layers"],
         "lora": ["features.mode=stream", "features.tune=lora"],
         "side_adapter": ["features.mode=cached", "features.tune=side_adapter"],
         # the media path alone (read by id, DALI decode, tokenize) over many steps: no encoder, no model step
         "prepare_only": ["features.mode=stream", "model.feature_normalization=none"]}
PHASES = ("read", "decode", "tokenize", "encode")


def time_preparation(trainer, steps: int) -> dict:
    """The media of `steps` training steps (epochs in order) read, decoded and tokenized, as the prefetch thread
    would, with nothing else running."""
    media, done, started = trainer.media, 0, time.perf_counter()
    images = media.totals["images"]
    epoch = 0
    while done < steps:
        for step, batch in trainer.plan.epoch_batches(epoch):
            prepared = media.prepare(trainer.step_item_ids(batch, done))
            media.totals["images"] += len(prepared.image_rows)
            media.totals["texts"] += len(prepared.text_rows)
            for phase, seconds in prepared.seconds.items():
                media.totals[phase] += seconds
            done += 1
            if done == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    totals = media.totals
    result = {"steps_timed": steps, "s_per_step": seconds / steps,
              "images_per_s": (totals["images"] - images) / seconds,
              "decode_images_per_s": (totals["images"] - images) / max(totals["decode"], 1e-9),
              "phase_s_per_step": {p: totals[p] / steps for p in PHASES}, "decoder": media.decoder_name,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    trainer.release()
    return result


def time_mode(data: str, config: str | None, overrides: list[str], steps: int, warmup: int, run_dir: Path,
              prepare_only: bool = False) -> dict:
    from train.config import load_config
    from train.loop import Trainer
    cfg = load_config(config, [f"data.path={data}", "model.loss_type=sampled_softmax", "logging.tensorboard=false",
                               "checkpoint.enabled=false", "eval.test=never", "logging.progress=false", *overrides])
    trainer = Trainer(cfg, run_dir)
    media = trainer.media
    if prepare_only:
        return time_preparation(trainer, steps)
    if warmup + steps > trainer.plan.steps_per_epoch:
        raise SystemExit(f"--warmup + --steps = {warmup + steps} is more than an epoch's "
                         f"{trainer.plan.steps_per_epoch} steps")
    times, targets, before = [], 0, None
    iterator = trainer.epoch_steps(0)
    for index in range(warmup + steps):
        if index == warmup:
            before = dict(media.totals) if media else None
        started = time.perf_counter()  # the step's media preparation included: inline, it is part of the step
        (_, batch), prepared = next(iterator)
        trainer.train_step(batch, prepared)
        trainer.state["global_step"] += 1
        if index >= warmup:
            times.append(time.perf_counter() - started)
            targets += batch.num_targets
    iterator.close()
    after = dict(media.totals) if media else None
    started = time.perf_counter()
    valid = trainer.evaluate_split("valid")
    valid_seconds = time.perf_counter() - started
    step = sum(times) / len(times)
    trained = [p for p in trainer.engine.module.parameters() if p.requires_grad]
    result = {"steps_timed": len(times), "s_per_step": step, "targets_per_s": targets / sum(times),
              "steps_per_epoch": trainer.plan.steps_per_epoch, "epoch_s": step * trainer.plan.steps_per_epoch,
              "valid_round_s": valid_seconds, "valid_ndcg@10": valid["ndcg@10"],
              "trained_parameters": sum(p.numel() for p in trained),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if media is not None:
        result["images_per_s"] = (after["images"] - before["images"]) / sum(times)
        result["texts_per_s"] = (after["texts"] - before["texts"]) / sum(times)
        result["phase_s_per_step"] = {p: (after[p] - before[p]) / len(times) for p in PHASES}
        result["decoder"] = media.decoder_name
    trainer.release()
    return result


def print_table(results: dict) -> None:
    print(f"\n{'mode':<14} {'s/step':>8} {'targets/s':>10} {'images/s':>9} {'texts/s':>8} {'epoch s':>9} "
          f"{'valid s':>8} {'trained params':>15} {'peak MB':>8}")
    for mode, r in results.items():
        if mode == "prepare_only":
            continue
        print(f"{mode:<14} {r['s_per_step']:>8.2f} {r['targets_per_s']:>10,.0f} {r.get('images_per_s', 0):>9,.0f} "
              f"{r.get('texts_per_s', 0):>8,.0f} {r['epoch_s']:>9.1f} {r['valid_round_s']:>8.1f} "
              f"{r['trained_parameters']:>15,} {r.get('peak_cuda_mb', r['peak_rss_mb']):>8,.0f}")
    prepared = results.get("prepare_only")
    if prepared:
        print(f"\nprepare_only, {prepared['steps_timed']} steps' media: {prepared['images_per_s']:,.0f} images/s "
              f"(decoding alone {prepared['decode_images_per_s']:,.0f} images/s, {prepared['decoder']}), "
              + ", ".join(f"{p} {prepared['phase_s_per_step'][p]:.3f}" for p in PHASES[:3]) + " s/step")
    inline = results.get("stream_inline")
    if inline:
        phases = inline["phase_s_per_step"]
        model = inline["s_per_step"] - sum(phases.values())
        print("\nstream_inline, seconds per step: " + ", ".join(f"{p} {phases[p]:.3f}" for p in PHASES)
              + f", model (ID table, CAMMSR, loss, optimizer) {model:.3f}")


def run_in_own_process(args, mode: str) -> dict:
    out = args.run_dir / f"{mode}.json"
    command = [sys.executable, "-m", "benchmarks.stream_benchmark", "--data", args.data, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--prepare-steps", str(args.prepare_steps), "--run-dir",
               str(args.run_dir), "--one-mode", mode,
               *(["--config", args.config] if args.config else []), *args.overrides]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"mode {mode} failed (its output is above)")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prepare-steps", type=int, default=300, help="steps of the prepare_only mode")
    parser.add_argument("--modes", default="cached,stream_inline,stream")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/stream_benchmark"))
    parser.add_argument("--record", help="write benchmarks/results/<ID>.json with this id")
    parser.add_argument("--one-mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # a child process's mode
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if args.one_mode:
        from train.distributed import shutdown
        prepare_only = args.one_mode == "prepare_only"
        result = time_mode(args.data, args.config, [*args.overrides, *MODES[args.one_mode]],
                           args.prepare_steps if prepare_only else args.steps, args.warmup,
                           args.run_dir / args.one_mode, prepare_only)
        (args.run_dir / f"{args.one_mode}.json").write_text(json.dumps(result, indent=1))
        shutdown()
        return 0
    from benchmarks.machine import describe_machine
    machine = describe_machine()
    results = {}
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {sorted(MODES)}")
        print(f"== {mode}", flush=True)
        results[mode] = run_in_own_process(args, mode)
    print(f"\n{machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}; torch {machine['torch']}; "
          f"{machine['date']}; load {machine['load_average_1m']}")
    print_table(results)
    (args.run_dir / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    if args.record:
        write_records(args, results, machine)
    return 0


def _command(args) -> str:
    return "python -m benchmarks.stream_benchmark " + " ".join(
        [f"--data {args.data}"] + ([f"--config {args.config}"] if args.config else [])
        + [f"--steps {args.steps}", f"--modes {args.modes}"]
        + ([f"--prepare-steps {args.prepare_steps}"] if "prepare_only" in args.modes else [])
        + [f"--record {args.record}", *args.overrides])


def write_records(args, results: dict, machine: dict) -> None:
    """ID: the stream-mode record (stream vs cached, the inline breakdown); ID_tune: the trainable modes' costs."""
    from benchmarks.results import write_record
    reference = ({"name": "cached mode, same run", "value": round(results["cached"]["epoch_s"], 1)}
                 if "cached" in results else None)
    stream = results.get("stream") or results.get("stream_inline")
    if stream:
        details = {"s/step": round(stream["s_per_step"], 3), "targets/s": round(stream["targets_per_s"]),
                   "images/s": round(stream["images_per_s"], 1), "texts/s": round(stream["texts_per_s"], 1),
                   "decoder": stream["decoder"], "steps timed": stream["steps_timed"]}
        if "cached" in results:
            details["cached s/step"] = round(results["cached"]["s_per_step"], 3)
        inline = results.get("stream_inline")
        if inline:
            phases = inline["phase_s_per_step"]
            details.update({f"inline {p} s/step": round(phases[p], 3) for p in PHASES})
            details["inline model s/step"] = round(inline["s_per_step"] - sum(phases.values()), 3)
        write_record(args.record, area="Stream mode", claim="training epoch with media streamed and encoded in the "
                     f"step, {Path(args.data).name}", metric="s/epoch (extrapolated)", ours=round(stream["epoch_s"], 1),
                     reference=reference, higher_is_better=False, details=details, ranking="no ranking metric",
                     command=_command(args), machine=machine)
    prepared = results.get("prepare_only")
    if prepared:
        write_record(f"{args.record}_prepare", area="Stream mode", claim="the steps' media read by id, decoded and "
                     f"tokenized (no encoder), {Path(args.data).name}", metric="images/s",
                     ours=round(prepared["images_per_s"], 1), details={
                         "decoding alone images/s": round(prepared["decode_images_per_s"], 1),
                         "decoder": prepared["decoder"], "steps timed": prepared["steps_timed"],
                         "s/step": round(prepared["s_per_step"], 3)},
                     ranking="no ranking metric", command=_command(args), machine=machine)
    for mode in ("top_layers", "lora", "side_adapter"):
        if mode not in results:
            continue
        r = results[mode]
        details = {"s/step": round(r["s_per_step"], 3), "targets/s": round(r["targets_per_s"]),
                   "trained encoder parameters": r["trained_parameters"] - results.get("cached", r).get(
                       "trained_parameters", 0),
                   "peak memory MB": round(r.get("peak_cuda_mb", r["peak_rss_mb"])),
                   "steps timed": r["steps_timed"]}
        write_record(f"{args.record}_{mode}", area="Trainable encoders", claim=f"training epoch, encoders "
                     f"{mode.replace('_', ' ')}, {Path(args.data).name}", metric="s/epoch (extrapolated)",
                     ours=round(r["epoch_s"], 1), reference=reference, higher_is_better=False, details=details,
                     ranking="no ranking metric", command=_command(args), machine=machine)


if __name__ == "__main__":
    raise SystemExit(main())
