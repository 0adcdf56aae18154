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

import numpy as np
import torch

from data_shards.features.store import open_store, store_name
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from train.category_labels import category_labels
from train.config import CategoriesConfig, DataConfig
from train.distributed import read_env


@dataclass
class ItemInputs:
    text: torch.Tensor | None  # [N + 1, F_t] (row 0 zero); token stores: [N + 1, T, F_t], zero at padding tokens
    image: torch.Tensor | None  # [N + 1, F_v]; token stores: [N + 1, 1 + P, F_v]
    categories: torch.Tensor | None  # [N + 1, C] float multi-hot
    has_category: torch.Tensor | None  # [N + 1] bool
    category_levels: list[int]
    category_names: list[str] | None = None
    category_summary: dict | None = None  # which labels (train.category_labels), None when the model reads none

    def rows(self, modality: str, ids: torch.Tensor) -> torch.Tensor | None:
        """The `modality` ("text" | "image") feature rows of item `ids` (any shape), None where the model has none."""
        table = self.text if modality == "text" else self.image
        return None if table is None else table[ids]

    @property
    def text_dim(self) -> int:
        return 0 if self.text is None else self.text.shape[-1]

    @property
    def image_dim(self) -> int:
        return 0 if self.image is None else self.image.shape[-1]

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


def ensure_feature_stores(data_cfg: DataConfig, modalities: tuple[str, ...], tokens: bool = False,
                          wait_s: float = 4 * 3600) -> None:
    """Make the stores current BEFORE the process group exists (extraction can outlast a collective timeout):
    global rank 0, as a single process, reuses each store whose fingerprint matches the configured encoder and
    rebuilds a missing or stale one; the other ranks wait for complete stores to appear (on a shared file
    system; otherwise run `cammsr extract` on every node first). `tokens`: the token / patch state stores."""
    needed = [m for m in ("text", "image") if m in modalities]
    if not needed:
        return
    data = PreparedDataset(data_cfg.path, verify=False)
    missing = [store_name(m, tokens) for m in needed if open_store(data, store_name(m, tokens)) is None]
    if not data_cfg.build_features:
        if missing:
            flag = " --tokens" if tokens else ""
            raise DataError(f"{data.root}: no feature store for {missing} (run `cammsr extract --data {data.root}"
                            f"{flag}` or set data.build_features=true)")
        return
    rank, _, _ = read_env()
    if rank == 0:
        from data_shards.features.extract import ExtractOptions, extract_features
        with _alone():
            extract_features(data.root, ExtractOptions(
                text_encoder=data_cfg.text_encoder, image_encoder=data_cfg.image_encoder,
                image_size=data_cfg.image_size, batch_size=data_cfg.extract_batch_size, modalities=tuple(needed),
                tokens=tokens, text_token_limit=data_cfg.text_token_limit, image_token_grid=data_cfg.image_token_grid))
        return
    deadline = time.time() + wait_s
    while any(open_store(data, name) is None for name in missing):
        if time.time() > deadline:
            raise DataError(f"{data.root}: waited {wait_s:.0f}s for rank 0 to build the {missing} feature stores "
                            "(not on a shared file system? run `cammsr extract` on every node first)")
        time.sleep(5)


def load_item_inputs(data: PreparedDataset, modalities: tuple[str, ...], need_categories: bool,
                     device: torch.device, categories: CategoriesConfig | None = None,
                     tokens: bool = False) -> ItemInputs:
    """The frozen feature tables of `modalities` (`tokens`: the token / patch states) and, when the model reads
    them, the category labels that `categories` (default: the dataset's own) chooses."""
    tables = {}
    for modality in ("text", "image"):
        if modality in modalities:
            store = open_store(data, store_name(modality, tokens))
            if store is None:
                raise DataError(f"{data.root}: the {store_name(modality, tokens)} feature store is missing or "
                                "incomplete")
            tables[modality] = np.asarray(store.features, dtype=np.float32)
    labels = has_category = summary = None
    levels, names = list(data.categories.get("levels", [])), list(data.categories.get("names", []))
    if need_categories:
        c = categories or CategoriesConfig()
        pooled = [table[:, 0] if table.ndim == 3 else table for table in tables.values()]  # token stores: [CLS]
        chosen = category_labels(data, c.source, c.virtual_count, c.noise, c.noise_type, c.label_seed, pooled)
        labels, levels, names, summary = (torch.from_numpy(chosen.labels).to(device), chosen.levels, chosen.names,
                                          chosen.summary)
        has_category = labels.sum(dim=1) > 0
    text, image = (None if tables.get(m) is None else torch.from_numpy(tables[m]).to(device)
                   for m in ("text", "image"))
    return ItemInputs(text, image, labels, has_category, levels, names, summary)
