"""The feature store: one fp16 row per item id (row 0 is padding) and a validity mask per modality,
stamped with a fingerprint of (item shards, encoder, preprocessing).

A store is valid only when its ``store.json`` exists with the expected fingerprint: the arrays are
written into a staging folder that is renamed into place last, so an interrupted run leaves no
store that could be mistaken for a complete one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.reader import PreparedDataset

STORE_FORMAT = 1
FEATURES_FILE, MASK_FILE, META_FILE = "features.npy", "mask.npy", "store.json"


def fingerprint(data: PreparedDataset, encoder_identity: str, preprocessing: dict) -> str:
    payload = {"format": STORE_FORMAT, "item_shards": [e["sha256"] for e in data.manifest["shards"]["items"]],
               "encoder": encoder_identity, "preprocessing": preprocessing}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def store_name(modality: str, tokens: bool) -> str:
    """The store of a modality's pooled vectors ("text") or of its token / patch states ("text_tokens")."""
    return f"{modality}_tokens" if tokens else modality


def store_dir(data: PreparedDataset, modality: str) -> Path:
    return data.root / "features" / modality


@dataclass
class FeatureStore:
    path: Path
    features: np.ndarray  # [num_items + 1, dim] (token stores: [num_items + 1, tokens, dim]) float16, memory-mapped
    mask: np.ndarray  # [num_items + 1] bool: True where the item has a usable input
    meta: dict

    @property
    def dim(self) -> int:
        return self.features.shape[-1]


def open_store(data: PreparedDataset, modality: str, expected_fingerprint: str | None = None) -> FeatureStore | None:
    """The complete store for ``modality``, or None if absent, partial or (given a fingerprint) stale."""
    path = store_dir(data, modality)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        return None
    features = np.load(path / FEATURES_FILE, mmap_mode="r")
    mask = np.load(path / MASK_FILE)
    if features.shape[0] != data.num_items + 1 or mask.shape != (data.num_items + 1,):
        return None
    return FeatureStore(path=path, features=features, mask=mask, meta=meta)


def write_store(data: PreparedDataset, modality: str, item_ids: np.ndarray, vectors: np.ndarray,
                meta: dict) -> FeatureStore:
    """Rows ``item_ids`` get ``vectors`` ([n, dim], or [n, tokens, dim] with zero vectors at padding tokens);
    every other row is zero and masked out."""
    final = store_dir(data, modality)
    staging = final.parent / f".{modality}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    features = np.lib.format.open_memmap(staging / FEATURES_FILE, mode="w+", dtype=np.float16,
                                         shape=(data.num_items + 1, *vectors.shape[1:]))
    features[:] = 0
    features[item_ids] = vectors.astype(np.float16)
    features.flush()
    del features
    mask = np.zeros(data.num_items + 1, dtype=bool)
    mask[item_ids] = True
    np.save(staging / MASK_FILE, mask)
    (staging / META_FILE).write_text(json.dumps({**meta, "format": STORE_FORMAT, "dim": int(vectors.shape[-1]),
                                                 "num_valid": int(mask.sum())}, indent=1, sort_keys=True))
    retired = final.parent / f".{modality}.stale-{os.getpid()}"
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)
    return open_store(data, modality)
