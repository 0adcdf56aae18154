"""Raw interactions -> the canonical dataset: dedupe, chronological order, k-core, id remap,
category vocabulary and item text. Source-agnostic; every removal is counted in the problem log."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_shards.problems import DataError, ProblemLog
from data_shards.raw import RawDataset

# Leave-one-out needs one training item, one validation item and one test item.
MIN_SEQUENCE_LENGTH = 3
DEDUPE_MODES = ("pair", "exact", "none")


@dataclass
class CategoryVocabulary:
    """Every prefix of every hierarchical path is a class: "Makeup", "Makeup|Nails", ..."""

    names: list[str]
    levels: list[int]
    parents: list[int]  # -1 for top-level classes

    def as_dict(self) -> dict:
        return {"names": self.names, "levels": self.levels, "parents": self.parents,
                "num_levels": max(self.levels) + 1 if self.levels else 0}


@dataclass
class CanonicalDataset:
    """Item ids are 1..num_items (0 is padding), user ids 0..num_users-1, both in order of first
    appearance after filtering. sequences[u] is chronological; the last item is the test target,
    the one before it the validation target."""

    item_original_ids: list[str]
    user_original_ids: list[str]
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray]
    item_texts: list[str]
    item_text_fields: list[dict[str, str]]
    item_category_paths: list[list[str]]
    item_category_labels: list[list[int]]
    vocabulary: CategoryVocabulary

    @property
    def num_items(self) -> int:
        return len(self.item_original_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_original_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(sequence) for sequence in self.sequences))


def _codes(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer codes in order of first appearance."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(value, len(index)) for value in values), dtype=np.int64,
                        count=len(values))
    return codes, list(index)


def _dedupe(user: np.ndarray, item: np.ndarray, time: np.ndarray, mode: str,
            problems: ProblemLog) -> np.ndarray:
    """Indices (in chronological order) of the interactions to keep: the first occurrence wins."""
    if mode not in DEDUPE_MODES:
        raise DataError(f"dedupe mode {mode!r} is not one of {DEDUPE_MODES}")
    order = np.lexsort((time, user))  # stable: ties keep file order
    if mode == "none":
        return order
    keys = np.stack([user[order], item[order]] + ([time[order]] if mode == "exact" else []), axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    if (dropped := int((~keep).sum())):
        problems.counts[f"duplicate_interaction_removed_{mode}"] += dropped
    return order[keep]


def _k_core(user: np.ndarray, item: np.ndarray, k: int, problems: ProblemLog) -> np.ndarray:
    """Mask of interactions surviving the iterated filter (users >= max(k, 3), items >= k)."""
    alive = np.ones(len(user), dtype=bool)
    min_user = max(k, MIN_SEQUENCE_LENGTH)
    while True:
        user_counts = np.bincount(user[alive], minlength=user.max() + 1)
        item_counts = np.bincount(item[alive], minlength=item.max() + 1)
        drop = alive & ((user_counts[user] < min_user) | (item_counts[item] < k))
        if not drop.any():
            break
        alive &= ~drop
    removed = len(user) - int(alive.sum())
    if removed:
        problems.counts[f"interaction_removed_by_filter_users>={min_user}_items>={k}"] += removed
    return alive


def _vocabulary(paths_per_item: list[list[list[str]]], min_count: int,
                problems: ProblemLog) -> CategoryVocabulary:
    counts: dict[tuple[str, ...], int] = {}
    for paths in paths_per_item:
        prefixes = {tuple(path[:depth]) for path in paths for depth in range(1, len(path) + 1)}
        for prefix in prefixes:
            counts[prefix] = counts.get(prefix, 0) + 1
    kept = sorted((prefix for prefix, count in counts.items() if count >= min_count),
                  key=lambda prefix: (len(prefix), prefix))
    for prefix, count in counts.items():
        if count < min_count:
            problems.skip("rare_category_dropped", "|".join(prefix), f"{count} items < {min_count}")
    index = {prefix: position for position, prefix in enumerate(kept)}
    return CategoryVocabulary(names=["|".join(prefix) for prefix in kept],
                              levels=[len(prefix) - 1 for prefix in kept],
                              parents=[index.get(prefix[:-1], -1) for prefix in kept])


CATEGORY_TEXT_FIELD = "categories"


def _item_text(text_fields: dict[str, str], fields: list[str], paths: list[list[str]],
               with_categories: bool) -> str:
    """The paper's "title + categories + brand": categories go where the pseudo-field
    ``categories`` stands in ``fields``, or after the first field when it is absent."""
    order = list(fields)
    if with_categories and CATEGORY_TEXT_FIELD not in order:
        order.insert(1, CATEGORY_TEXT_FIELD)
    parts = []
    for field in order:
        if field == CATEGORY_TEXT_FIELD:
            parts += [" > ".join(path) for path in paths] if with_categories else []
        else:
            parts.append(text_fields.get(field, ""))
    return ". ".join(part for part in parts if part)


def canonicalize(raw: RawDataset, k_core: int = 5, dedupe: str = "pair",
                 min_category_count: int = 1, text_with_categories: bool = True) -> CanonicalDataset:
    problems = raw.problems
    if not raw.users:
        raise DataError(f"{raw.description}: no interactions")
    user, user_names = _codes(raw.users)
    item, item_names = _codes(raw.items)
    time = np.asarray(raw.timestamps, dtype=np.float64)

    kept = _dedupe(user, item, time, dedupe, problems)
    user, item, time = user[kept], item[kept], time[kept]
    alive = _k_core(user, item, k_core, problems)
    user, item, time = user[alive], item[alive], time[alive]
    if len(user) == 0:
        raise DataError(f"{raw.description}: nothing left after the {k_core}-core filter "
                        f"(users need >= {max(k_core, MIN_SEQUENCE_LENGTH)} interactions)")

    # Remap to dense ids by first appearance in file order (the order RecBole uses).
    file_order = np.argsort(kept[alive], kind="stable")
    new_user, user_first = np.unique(user[file_order], return_index=True)
    user_rank = np.empty(len(user_names), dtype=np.int64)
    user_rank[new_user[np.argsort(user_first)]] = np.arange(len(new_user))
    new_item, item_first = np.unique(item[file_order], return_index=True)
    item_rank = np.empty(len(item_names), dtype=np.int64)
    item_rank[new_item[np.argsort(item_first)]] = np.arange(1, len(new_item) + 1)
    dense_user, dense_item = user_rank[user], item_rank[item]

    boundaries = np.flatnonzero(np.diff(user)) + 1  # interactions are grouped by user, chronological
    starts = np.concatenate([[0], boundaries])
    order_of_users = np.argsort(dense_user[starts])
    item_groups = np.split(dense_item, boundaries)
    time_groups = np.split(time, boundaries)
    sequences = [item_groups[g] for g in order_of_users]
    timestamps = [time_groups[g] for g in order_of_users]

    item_original_ids = [item_names[code] for code in new_item[np.argsort(item_first)]]
    user_original_ids = [user_names[code] for code in new_user[np.argsort(user_first)]]

    text_fields, paths_per_item = [], []
    for original_id in item_original_ids:
        record = raw.catalogue.get(original_id)
        if record is None:
            if raw.catalogue:
                problems.skip("item_without_metadata_kept", f"item {original_id}",
                              "in the interactions but not in the item file")
        text_fields.append(record.text_fields if record else {})
        paths_per_item.append(record.categories if record else [])
    vocabulary = _vocabulary(paths_per_item, min_category_count, problems)
    class_index = {name: position for position, name in enumerate(vocabulary.names)}
    labels, flat_paths, texts = [], [], []
    for original_id, fields, paths in zip(item_original_ids, text_fields, paths_per_item):
        item_labels = sorted({class_index[name] for path in paths for depth in range(1, len(path) + 1)
                              if (name := "|".join(path[:depth])) in class_index})
        if not item_labels and raw.catalogue:
            problems.skip("item_without_category_kept", f"item {original_id}", "no known category")
        text = _item_text(fields, raw.text_fields, paths, text_with_categories)
        if not text and raw.catalogue:
            problems.skip("item_with_empty_text_kept", f"item {original_id}", "all text fields empty")
        labels.append(item_labels)
        flat_paths.append(["|".join(path) for path in paths])
        texts.append(text)
    return CanonicalDataset(item_original_ids=item_original_ids, user_original_ids=user_original_ids,
                            sequences=sequences, timestamps=timestamps, item_texts=texts,
                            item_text_fields=text_fields, item_category_paths=flat_paths,
                            item_category_labels=labels, vocabulary=vocabulary)
