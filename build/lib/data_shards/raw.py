"""The in-memory form every source produces before processing: original ids, file order kept.

A source reads its own format and returns a :class:`RawDataset`; everything after that
(dedupe, k-core, remapping, splitting, shard writing) is shared and source-agnostic.
Images are loaded lazily through ``RawDataset.load_image`` so catalogues with millions of
items never hold all image bytes in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from data_shards.problems import ProblemLog


@dataclass
class RawItem:
    """One item's metadata as the source gave it (text fields already decoded to str)."""

    original_id: str
    text_fields: dict[str, str]
    # Each label is a hierarchical path, outermost level first: [["Makeup", "Nails", "Nail Polish"]].
    # An empty list means the item has no category label.
    categories: list[list[str]] = field(default_factory=list)


@dataclass
class RawImage:
    """Image bytes exactly as found, with where they came from (for error messages)."""

    data: bytes
    origin: str


@dataclass
class RawDataset:
    name: str
    description: str
    # Interactions in file order: parallel lists of original user id, original item id, timestamp.
    users: list[str]
    items: list[str]
    timestamps: list[float]
    catalogue: dict[str, RawItem]
    # Original item id -> image bytes, or None when the item has no image; None for a source
    # without any images (then no per-item "missing image" is counted).
    load_image: Callable[[str], RawImage | None] | None
    problems: ProblemLog
    # The text fields, in order, that make an item's text (categories are appended separately).
    text_fields: list[str] = field(default_factory=list)
    # Name of the source and the options that produced this dataset (recorded in the manifest).
    source: dict = field(default_factory=dict)
