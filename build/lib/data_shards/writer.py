"""Canonical dataset -> WebDataset shards + DALI index files + manifest, written atomically.

Shards are byte-identical for identical input: fixed tar metadata (mtime 0), samples in id order,
JSON with sorted keys. The folder appears under its final name only once complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm
from wds2idx import IndexCreator

from data_shards.checksum import sha256_file
from data_shards.layout import (DALI_INDEX_SUFFIX, ITEM_SHARD_PATTERN, MANIFEST, SCHEMA_VERSION,
                                USER_SHARD_PATTERN, item_key, user_key)
from data_shards.media import UnusableImage, image_extension
from data_shards.problems import DataError
from data_shards.process import CanonicalDataset
from data_shards.raw import RawDataset


def _json_bytes(value) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _ShardSet:
    """A ShardWriter that records each finished shard's file, sample count and checksum."""

    def __init__(self, root: Path, pattern: str, max_samples: int, max_bytes: int, dali_index: bool):
        (root / pattern).parent.mkdir(parents=True, exist_ok=True)
        self.root, self.dali_index = root, dali_index
        self.shards: list[dict] = []
        self._count_at_last_shard = 0
        self.writer = wds.ShardWriter(str(root / pattern), maxcount=max_samples, maxsize=max_bytes,
                                      post=self._finished, verbose=0, mtime=0.0, encoder=False)

    def _finished(self, filename: str) -> None:
        path = Path(filename)
        entry = {"file": str(path.relative_to(self.root)), "sha256": sha256_file(path),
                 "bytes": path.stat().st_size,
                 "num_samples": self.writer.total - self._count_at_last_shard}
        if self.dali_index:
            index_path = path.with_suffix(DALI_INDEX_SUFFIX)
            with IndexCreator(str(path), str(index_path), verbose=False) as creator:
                creator.create_index()
            entry["dali_index"] = str(index_path.relative_to(self.root))
        self._count_at_last_shard = self.writer.total
        self.shards.append(entry)

    def write(self, sample: dict) -> None:
        self.writer.write(sample)

    def close(self) -> list[dict]:
        self.writer.close()
        return self.shards


def _write_items(data: CanonicalDataset, raw: RawDataset, root: Path, max_samples: int,
                 max_bytes: int) -> tuple[list[dict], int]:
    shards = _ShardSet(root, ITEM_SHARD_PATTERN, max_samples, max_bytes, dali_index=True)
    with_image = 0
    for position in tqdm(range(data.num_items), desc="writing item shards", unit="item"):
        item_id = position + 1
        original_id = data.item_original_ids[position]
        sample = {
            "__key__": item_key(item_id),
            "txt": data.item_texts[position].encode("utf-8"),
            "json": _json_bytes({"item_id": item_id, "original_id": original_id,
                                 "text_fields": data.item_text_fields[position],
                                 "categories": data.item_category_paths[position],
                                 "labels": data.item_category_labels[position]}),
        }
        image = raw.load_image(original_id) if raw.load_image else None
        if image is None and raw.load_image:
            raw.problems.skip("item_without_image_kept", f"item {original_id}", "no image found")
        elif image is not None:
            try:
                sample[image_extension(image.data)] = image.data
                with_image += 1
            except UnusableImage as err:
                raw.problems.skip("unusable_image_item_kept_without_image", image.origin, str(err))
        shards.write(sample)
    return shards.close(), with_image


def _write_users(data: CanonicalDataset, root: Path, max_samples: int, max_bytes: int) -> list[dict]:
    shards = _ShardSet(root, USER_SHARD_PATTERN, max_samples, max_bytes, dali_index=False)
    for user_id in tqdm(range(data.num_users), desc="writing user shards", unit="user"):
        shards.write({"__key__": user_key(user_id), "json": _json_bytes({
            "user_id": user_id, "original_id": data.user_original_ids[user_id],
            "items": data.sequences[user_id].tolist(), "timestamps": data.timestamps[user_id].tolist()})})
    return shards.close()


def _statistics(data: CanonicalDataset, with_image: int) -> dict:
    """The paper's Table II columns plus what the later stages want to know up front."""
    lengths = np.array([len(sequence) for sequence in data.sequences])
    return {
        "users": data.num_users, "items": data.num_items, "interactions": data.num_interactions,
        "avg_actions_per_user": round(float(lengths.mean()), 4),
        "avg_actions_per_item": round(data.num_interactions / data.num_items, 4),
        "max_sequence_length": int(lengths.max()),
        "sparsity": round(1 - data.num_interactions / (data.num_users * data.num_items), 6),
        "categories": len(data.vocabulary.names),
        "items_with_image": with_image,
        "items_with_text": sum(1 for text in data.item_texts if text),
        "items_with_category": sum(1 for labels in data.item_category_labels if labels),
        "training_prefixes": int((lengths - 3).sum()),
    }


def build_manifest(data: CanonicalDataset, raw: RawDataset, processing: dict, item_shards: list[dict],
                   user_shards: list[dict], with_image: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": raw.name,
        "description": raw.description,
        "source": raw.source,
        "processing": processing,
        "split": {"protocol": "leave_one_out", "test": "last item of each user",
                  "valid": "second to last item", "train": "all earlier items"},
        "num_users": data.num_users,
        "num_items": data.num_items,
        "num_interactions": data.num_interactions,
        "num_items_with_image": with_image,
        "padding_item_id": 0,
        "statistics": _statistics(data, with_image),
        "categories": data.vocabulary.as_dict(),
        "text_fields": raw.text_fields,
        "shards": {"items": item_shards, "users": user_shards},
        "problems": raw.problems.as_dict(),
    }


def _same_dataset(existing: Path, manifest: dict) -> bool:
    try:
        return json.loads(existing.read_text()) == json.loads(json.dumps(manifest))
    except (OSError, ValueError):
        return False


def write_dataset(data: CanonicalDataset, raw: RawDataset, out: Path, processing: dict,
                  shard_max_items: int, shard_max_bytes: int, overwrite: bool) -> tuple[dict, str]:
    """Write into a hidden sibling folder, then move it into place. Returns (manifest, outcome)."""
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"--out {out} is not empty and holds no {MANIFEST}; refusing to write into it "
                        "(choose an empty folder or pass --overwrite)")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        item_shards, with_image = _write_items(data, raw, staging, shard_max_items, shard_max_bytes)
        user_shards = _write_users(data, staging, shard_max_items, shard_max_bytes)
        manifest = build_manifest(data, raw, processing, item_shards, user_shards, with_image)
        (staging / MANIFEST).write_bytes(json.dumps(manifest, indent=1, sort_keys=True,
                                                    ensure_ascii=False).encode("utf-8"))
        if (out / MANIFEST).exists():
            if _same_dataset(out / MANIFEST, manifest):
                shutil.rmtree(staging)
                return manifest, "unchanged (an identical dataset was already there)"
            if not overwrite:
                old = json.loads((out / MANIFEST).read_text())
                new = json.loads(json.dumps(manifest))
                differing = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
                raise DataError(
                    f"--out {out} already holds a different dataset ({old.get('name')!r}: "
                    f"{old.get('num_users')} users, {old.get('num_items')} items, "
                    f"{old.get('num_interactions')} interactions; new: {manifest['num_users']} users, "
                    f"{manifest['num_items']} items, {manifest['num_interactions']} interactions; manifest "
                    f"fields that differ: {', '.join(differing)}); "
                    "pass --overwrite to replace it")
        if out.exists():
            retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
        return manifest, "written"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
