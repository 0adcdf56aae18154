"""The item category labels a run trains with (`categories.*` config keys): the dataset's own, one category path per
item, or virtual categories from the items' content; then, optionally, the seeded label noise of the CAMMSR paper's
noise study (Table V). The shards are never changed: every setting is a view of the same prepared dataset.

- source "dataset": every label the item has (Table VII's multi-label setting: an item with two category paths has
  two labels on a level; category guidance pools one difference per level, model.category_pooling).
- source "first_path": only the item's first category path (one label per level).
- source "virtual": Table VII's "none category" setting. The paper asks GPT-4o for virtual categories from each
  item's text and image; no language model runs here, so the virtual categories are k-means clusters
  (`virtual_count`, seeded) of the items' frozen text/image features (each dimension z-scored, the modalities
  concatenated): categories from the item's content, as the paper's are, one level. Items without features get none.
- noise: a seeded `noise` fraction of the labelled items is corrupted. "removal": their labels are deleted (category
  guidance falls back to equal modality weights for them, as in the paper); "misleading": their labels are replaced
  by the labels of another randomly chosen labelled item whose labels differ (wrong, but still a valid path).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.problems import DataError
from data_shards.reader import PreparedDataset

CATEGORY_SOURCES = ("dataset", "first_path", "virtual")
NOISE_TYPES = ("removal", "misleading")


@dataclass
class CategoryLabels:
    labels: np.ndarray  # [N + 1, C] float32 multi-hot, row 0 (padding) empty
    names: list[str]  # name of each vocabulary entry
    levels: list[int]  # level of each vocabulary entry
    summary: dict  # what was done, for the run's log and metrics.json


def dataset_labels(data: PreparedDataset, first_path_only: bool) -> np.ndarray:
    names = list(data.categories.get("names", []))
    index = {name: number for number, name in enumerate(names)}
    labels = np.zeros((data.num_items + 1, len(names)), dtype=np.float32)
    for item in data.items():
        chosen = item.labels
        if first_path_only and item.categories:
            chosen = first_path(item.categories[0], index)
        if chosen:
            labels[item.item_id, chosen] = 1.0
    return labels


def first_path(path: str, index: dict[str, int]) -> list[int]:
    """Vocabulary ids of a category path ("Beauty|Makeup|Lips") and of each of its prefixes that is a category."""
    parts = path.split("|")
    prefixes = ("|".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return [index[prefix] for prefix in prefixes if prefix in index]


def virtual_labels(features: list[np.ndarray], count: int, seed: int) -> np.ndarray:
    """[N + 1, count] one-hot k-means clusters of the items' concatenated, z-scored feature rows (row 0 and items
    with no features: no label)."""
    from sklearn.cluster import KMeans
    present = np.zeros(features[0].shape[0], dtype=bool)
    scaled = []
    for table in features:
        rows = np.abs(table).sum(axis=1) > 0
        present |= rows
        mean, std = table[rows].mean(axis=0), table[rows].std(axis=0) + 1e-6
        scaled.append(np.where(rows[:, None], (table - mean) / std, 0.0) / np.sqrt(table.shape[1]))
    present[0] = False
    points = np.concatenate(scaled, axis=1)[present]
    if len(points) < count:
        raise DataError(f"categories.virtual_count={count}: only {len(points)} items have features to cluster")
    clusters = KMeans(n_clusters=count, n_init=4, random_state=seed).fit_predict(points.astype(np.float64))
    labels = np.zeros((features[0].shape[0], count), dtype=np.float32)
    labels[np.flatnonzero(present), clusters] = 1.0
    return labels


def add_noise(labels: np.ndarray, fraction: float, kind: str, seed: int) -> tuple[np.ndarray, int]:
    """A copy of `labels` with round(fraction x labelled items) of the labelled items corrupted; (labels, count)."""
    noisy = labels.copy()
    labelled = np.flatnonzero(labels.sum(axis=1) > 0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(labelled, size=int(round(fraction * len(labelled))), replace=False)
    if kind == "removal":
        noisy[chosen] = 0.0
        return noisy, len(chosen)
    distinct = len(np.unique(labels[labelled], axis=0))
    if distinct < 2:
        raise DataError("categories.noise_type=misleading needs items with at least two different label sets")
    for item in chosen:
        donor = item
        while np.array_equal(labels[donor], labels[item]):
            donor = labelled[rng.integers(len(labelled))]
        noisy[item] = labels[donor]
    return noisy, len(chosen)


def category_labels(data: PreparedDataset, source: str, virtual_count: int, noise: float, noise_type: str,
                    seed: int, feature_tables: list[np.ndarray]) -> CategoryLabels:
    """The labels of a run; `feature_tables`: the run's frozen text/image feature tables (for source "virtual")."""
    if source == "virtual":
        if not feature_tables:
            raise DataError("categories.source=virtual clusters the items' text/image features: the run needs a "
                            "cached feature store of an enabled content modality (features.mode=cached)")
        labels, levels = virtual_labels(feature_tables, virtual_count, seed), [0] * virtual_count
        names = [f"virtual-{k}" for k in range(virtual_count)]
    else:
        labels = dataset_labels(data, first_path_only=source == "first_path")
        levels, names = list(data.categories.get("levels", [])), list(data.categories.get("names", []))
        if labels.shape[1] == 0:
            raise DataError(f"{data.root}: the dataset has no categories (set categories.source=virtual for "
                            "categories from the items' content, or turn the model's category use off)")
    summary = {"source": source, "labelled_items": int((labels.sum(axis=1) > 0).sum()),
               "vocabulary": int(labels.shape[1])}
    if noise > 0:
        labels, corrupted = add_noise(labels, noise, noise_type, seed)
        summary.update(noise=noise, noise_type=noise_type, corrupted_items=corrupted)
    return CategoryLabels(labels, names, levels, summary)
