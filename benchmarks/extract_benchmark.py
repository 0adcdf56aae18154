"""Feature-extraction throughput on real posters: DALI vs the PIL fallback (decode + preprocess,
side by side in one run), then the whole extract stage (text and image encoders included).

    python benchmarks/extract_benchmark.py [--data ../shared/data/ml1m_posters] [--work /tmp/cammsr-bench]

Prints a JSON record with the machine; add it to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.machine import describe_machine
from data_shards.features.dali_images import dali_image_batches
from data_shards.features.extract import ExtractOptions, extract_features
from data_shards.features.pil_images import pil_image_batches
from data_shards.features.preprocess import ImagePreprocessing
from data_shards.prepare import PrepareOptions, prepare
from data_shards.reader import PreparedDataset
from data_shards.sources.recbole import read_recbole


def _images_per_second(batches) -> tuple[float, int]:
    count, start = 0, time.perf_counter()
    for ids, pixels in batches:
        count += len(ids)
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/ml1m_posters"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/cammsr-bench"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="decode passes per reader (best is reported)")
    parser.add_argument("--skip-stage", action="store_true", help="only the decode comparison")
    args = parser.parse_args()

    prepared = args.work / args.data.name
    if not (prepared / "manifest.json").exists():
        prepare(read_recbole(args.data), prepared, PrepareOptions(k_core=1))
    data = PreparedDataset(prepared)
    prep = ImagePreprocessing()
    threads = len(__import__("os").sched_getaffinity(0))
    result = {"machine": describe_machine(), "dataset": str(args.data), "images": data.manifest["num_items_with_image"],
              "preprocessing": prep.as_dict(), "workers_or_threads": threads}
    for name, make in (("dali", lambda: dali_image_batches(data, prep, args.batch_size, num_threads=threads)),
                       ("pil", lambda: pil_image_batches(data, prep, args.batch_size, workers=threads))):
        runs = [_images_per_second(make())[0] for _ in range(args.repeats)]
        result[f"decode_{name}_images_per_s"] = round(max(runs), 1)
        print(f"decode+preprocess {name}: best {max(runs):.1f} images/s over {args.repeats} passes", flush=True)
    result["dali_over_pil"] = round(result["decode_dali_images_per_s"] / result["decode_pil_images_per_s"], 2)
    if not args.skip_stage:
        start = time.perf_counter()
        extract_features(prepared, ExtractOptions(batch_size=args.batch_size, force=True))
        seconds = time.perf_counter() - start
        result["stage_seconds"] = round(seconds, 1)
        result["stage_items_per_s"] = round(data.num_items / seconds, 2)
        result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
