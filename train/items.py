"""Per-item side inputs of the model: frozen text/image feature tables and category labels, indexed by item id.

Feature stores are built first (data_shards.features.extract) when the model needs a modality that has none. In
stream mode (train.media) the tables are encoded from the shards instead, and a step reads `StepFeatures`, which
answers the same `rows` call.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_shards.features.store import open_store
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from train.distributed import read_env


@dataclass
class ItemInputs:
    text: torch.Tensor | None  # [N + 1, F_t] (row 0 zero)
    image: torch.Tensor | None  # [N + 1, F_v]
    categories: torch.Tensor | None  # [N + 1, C] float multi-hot
    has_category: torch.Tensor | None  # [N + 1] bool
    category_levels: list[int]

    def rows(self, modality: str, ids: torch.Tensor) -> torch.Tensor | None:
        """The `modality` ("text" | "image") feature rows of item `ids` (any shape), None where the model has none."""
        table = self.text if modality == "text" else self.image
        return None if table is None else table[ids]

    @property
    def text_dim(self) -> int:
        return 0 if self.text is None else self.text.shape[1]

    @property
    def image_dim(self) -> int:
        return 0 if self.image is None else self.image.shape[1]

    @property
    def num_categories(self) -> int:
        return 0 if self.categories is None else self.categories.shape[1]


@contextmanager
def _alone():
    """Rank 0 extracts before the process group exists: accelerate must see a world of one."""
    hidden = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
              if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(hidden)


def ensure_feature_stores(root: Path, modalities: tuple[str, ...], build: bool, text_encoder: str,
                          image_encoder: str, image_size: int, batch_size: int, wait_s: float = 4 * 3600) -> None:
    """Make the stores current BEFORE the process group exists (extraction can outlast a collective timeout):
    global rank 0, as a single process, reuses each store whose fingerprint matches the configured encoder and
    rebuilds a missing or stale one; the other ranks wait for complete stores to appear (on a shared file
    system; otherwise run `cammsr extract` on every node first)."""
    needed = [m for m in ("text", "image") if m in modalities]
    if not needed:
        return
    data = PreparedDataset(root, verify=False)
    missing = [m for m in needed if open_store(data, m) is None]
    if not build:
        if missing:
            raise DataError(f"{data.root}: no feature store for {missing} (run `cammsr extract --data {data.root}` "
                            "or set data.build_features=true)")
        return
    rank, _, _ = read_env()
    if rank == 0:
        from data_shards.features.extract import ExtractOptions, extract_features
        with _alone():
            extract_features(data.root, ExtractOptions(text_encoder=text_encoder, image_encoder=image_encoder,
                                                       image_size=image_size, batch_size=batch_size, modalities=tuple(needed)))
        return
    deadline = time.time() + wait_s
    while any(open_store(data, m) is None for m in missing):
        if time.time() > deadline:
            raise DataError(f"{data.root}: waited {wait_s:.0f}s for rank 0 to build the {missing} feature stores "
                            "(not on a shared file system? run `cammsr extract` on every node first)")
        time.sleep(5)


def load_item_inputs(data: PreparedDataset, modalities: tuple[str, ...], need_categories: bool,
                     device: torch.device) -> ItemInputs:
    tables = {}
    for modality in ("text", "image"):
        if modality in modalities:
            store = open_store(data, modality)
            if store is None:
                raise DataError(f"{data.root}: the {modality} feature store is missing or incomplete")
            tables[modality] = torch.from_numpy(np.asarray(store.features, dtype=np.float32)).to(device)
    categories = has_category = None
    levels = list(data.categories.get("levels", []))
    if need_categories:
        num_categories = len(data.categories.get("names", []))
        if num_categories == 0:
            raise DataError(f"{data.root}: the model uses category guidance but the dataset has no categories "
                            "(set model.use_category_guidance=false)")
        labels = np.zeros((data.num_items + 1, num_categories), dtype=np.float32)
        for item in data.items():
            if item.labels:
                labels[item.item_id, item.labels] = 1.0
        categories = torch.from_numpy(labels).to(device)
        has_category = categories.sum(dim=1) > 0
    return ItemInputs(tables.get("text"), tables.get("image"), categories, has_category, levels)
