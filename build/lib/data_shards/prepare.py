"""The `prepare` stage: a source -> canonical dataset -> shards, with a printed summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_shards.process import canonicalize
from data_shards.raw import RawDataset
from data_shards.writer import write_dataset


@dataclass
class PrepareOptions:
    k_core: int = 5
    dedupe: str = "pair"
    min_category_count: int = 1
    text_with_categories: bool = True
    shard_max_items: int = 10_000
    shard_max_bytes: int = 256 * 1024 * 1024
    overwrite: bool = False


def prepare(raw: RawDataset, out: Path, options: PrepareOptions) -> dict:
    data = canonicalize(raw, k_core=options.k_core, dedupe=options.dedupe,
                        min_category_count=options.min_category_count,
                        text_with_categories=options.text_with_categories)
    processing = {"k_core": options.k_core, "dedupe": options.dedupe,
                  "min_category_count": options.min_category_count,
                  "text_with_categories": options.text_with_categories,
                  "shard_max_items": options.shard_max_items, "shard_max_bytes": options.shard_max_bytes}
    manifest, outcome = write_dataset(data, raw, out, processing, options.shard_max_items,
                                      options.shard_max_bytes, options.overwrite)
    stats = manifest["statistics"]
    print(f"dataset {manifest['name']!r} at {out}: {outcome}")
    print(f"  {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions, "
          f"avg length {stats['avg_actions_per_user']:.2f}, sparsity {stats['sparsity']:.4%}")
    if raw.load_image is None:
        print("  the source has no images: a text/ID/category dataset")
    print(f"  {stats['items_with_image']:,} items with an image, {stats['items_with_text']:,} with text, "
          f"{stats['items_with_category']:,} with a category ({stats['categories']} classes, "
          f"{manifest['categories']['num_levels']} level(s))")
    print(f"  {len(manifest['shards']['items'])} item shards, {len(manifest['shards']['users'])} user shards")
    print("input problems (skipped or repaired, counted; examples in manifest.json 'problems'):")
    for line in raw.problems.summary_lines():
        print(f"  {line}")
    return manifest
