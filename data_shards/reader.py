"""Reading a prepared dataset: manifest and checksums verified before anything is yielded."""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data_shards.checksum import sha256_file
from data_shards.layout import MANIFEST, SCHEMA_VERSION
from data_shards.media import IMAGE_EXTENSIONS
from data_shards.problems import DataError


def _every_shard(urls):
    return urls


@dataclass
class ItemRecord:
    item_id: int
    original_id: str
    text: str
    text_fields: dict[str, str]
    categories: list[str]
    labels: list[int]
    image: bytes | None
    image_format: str | None


@dataclass
class UserSequence:
    user_id: int
    original_id: str
    items: np.ndarray
    timestamps: np.ndarray


class PreparedDataset:
    """A folder written by ``cammsr prepare``. ``verify=True`` checks every shard's size and sha256."""

    def __init__(self, root: Path | str, verify: bool = True) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.root} is not a prepared dataset: no {MANIFEST} (run `cammsr prepare`)")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise DataError(f"{manifest_path}: not valid JSON ({err})") from err
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"{manifest_path}: schema_version {version!r}, this reader needs {SCHEMA_VERSION}")
        if verify:
            self.verify()

    @property
    def num_items(self) -> int:
        return self.manifest["num_items"]

    @property
    def num_users(self) -> int:
        return self.manifest["num_users"]

    @property
    def categories(self) -> dict:
        return self.manifest["categories"]

    def shard_paths(self, kind: str) -> list[Path]:
        return [self.root / entry["file"] for entry in self.manifest["shards"][kind]]

    def present_shard(self, entry: dict) -> Path:
        """The path of a manifest shard entry, checked to exist with its recorded size (DataError naming it)."""
        path = self.root / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced shard)")
        return path

    def verify(self) -> None:
        entries = self.manifest["shards"]["items"] + self.manifest["shards"]["users"]
        for entry in tqdm(entries, desc="verifying shards", unit="shard", leave=False):
            path = self.present_shard(entry)
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise DataError(f"{path}: sha256 {digest} does not match {MANIFEST} ({entry['sha256']})")

    def _samples(self, kind: str, shard_ids: list[int] | None = None) -> Iterator[dict]:
        paths = self.shard_paths(kind)
        for shard_id in range(len(paths)) if shard_ids is None else shard_ids:
            path = paths[shard_id]
            try:
                # The caller chooses which shards each rank reads: no splitting by node or worker here.
                yield from wds.WebDataset(str(path), shardshuffle=False, empty_check=False,
                                          nodesplitter=_every_shard, workersplitter=_every_shard)
            except (tarfile.TarError, OSError, ValueError) as err:
                raise DataError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from err

    def items(self, shard_ids: list[int] | None = None) -> Iterator[ItemRecord]:
        """Items in id order (all shards, or the given item shard indices)."""
        for sample in self._samples("items", shard_ids):
            meta = json.loads(sample["json"])
            image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            yield ItemRecord(item_id=meta["item_id"], original_id=meta["original_id"],
                             text=sample["txt"].decode("utf-8"), text_fields=meta["text_fields"],
                             categories=meta["categories"], labels=meta["labels"],
                             image=sample.get(image_format) if image_format else None,
                             image_format=image_format)

    def user_sequences(self, rank: int = 0, world_size: int = 1) -> Iterator[UserSequence]:
        """Users with ``user_id % world_size == rank``: every user on exactly one rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        for sample in self._samples("users"):
            meta = json.loads(sample["json"])
            if meta["user_id"] % world_size == rank:
                yield UserSequence(user_id=meta["user_id"], original_id=meta["original_id"],
                                   items=np.asarray(meta["items"], dtype=np.int64),
                                   timestamps=np.asarray(meta["timestamps"], dtype=np.float64))
