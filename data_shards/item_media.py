"""Random access to item samples by id: the raw image bytes and the text of any item, read straight from its shard
at the offsets its DALI index (`items-NNNNNN.idx`, written by `cammsr prepare`) records, without walking the
catalogue. What stream mode reads every training step.

Opening checks every item shard against the manifest (present, size as recorded) and every index entry against its
shard (offsets inside the file), so a missing or truncated shard stops the run before its first step, named. The
index format (DALI's wds2idx, version 1.2): a header `v1.2 <samples>`, then one line per sample of
`<ext> <offset> <size> <member name>` triples.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data_shards.media import IMAGE_EXTENSIONS
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int


@dataclass
class ItemMedia:
    item_id: int
    text: str
    image: bytes | None  # None: the item has no image member; b"" an empty one
    image_format: str | None
    shard: str  # the shard file, relative to the dataset folder (for messages)


def _parse_index(index_path: Path, shard: str, shard_bytes: int) -> dict[int, dict[str, _Member]]:
    """item id -> {extension: member} of one shard's index; DataError naming the file on anything malformed."""
    try:
        lines = index_path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"{index_path}: the shard index of {shard} cannot be read ({err})") from err
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise DataError(f"{index_path}: not a DALI {INDEX_VERSION} index (header {lines[:1]!r})")
    members: dict[int, dict[str, _Member]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) % 4:
            raise DataError(f"{index_path}:{number}: expected <ext> <offset> <size> <name> triples, got {line!r}")
        components = {}
        item_id = None
        for ext, offset, size, name in zip(fields[::4], fields[1::4], fields[2::4], fields[3::4]):
            offset, size = int(offset), int(size)
            if offset < 0 or size < 0 or offset + size > shard_bytes:
                raise DataError(f"{index_path}:{number}: member {name} at {offset}+{size} lies outside {shard} "
                                f"({shard_bytes} bytes): truncated shard or stale index")
            key = name.rsplit(".", 1)[0]
            item_id = int(key)
            components[ext] = _Member(offset, size)
        members[item_id] = components
    if len(members) != int(header[1]):
        raise DataError(f"{index_path}: header says {header[1]} samples, the index lists {len(members)}")
    return members


class ItemMediaReader:
    """`read(ids)` -> the ItemMedia of each id, from the shards by offset. Thread-safe (positional reads)."""

    def __init__(self, data: PreparedDataset):
        self.data = data
        self._files: list[int] = []
        self._shards: list[str] = []
        self._where: dict[int, tuple[int, dict[str, _Member]]] = {}
        for entry in data.manifest["shards"]["items"]:
            path = data.present_shard(entry)
            size = entry["bytes"]
            if "dali_index" not in entry:
                raise DataError(f"{path}: the manifest names no index for this shard (re-run `cammsr prepare`)")
            shard_number = len(self._shards)
            for item_id, members in _parse_index(data.root / entry["dali_index"], entry["file"], size).items():
                self._where[item_id] = (shard_number, members)
            self._shards.append(entry["file"])
            self._files.append(os.open(path, os.O_RDONLY))
        if len(self._where) != data.num_items:
            raise DataError(f"{data.root}: the item shard indexes list {len(self._where)} items, the manifest "
                            f"{data.num_items}")

    def shard_of(self, item_id: int) -> str:
        return self._shards[self._where[item_id][0]]

    def _member(self, shard_number: int, member: _Member) -> bytes:
        data = os.pread(self._files[shard_number], member.size, member.offset)
        if len(data) != member.size:
            raise DataError(f"{self.data.root / self._shards[shard_number]}: short read at {member.offset} "
                            f"({len(data)} of {member.size} bytes): the shard changed under the run")
        return data

    def read(self, item_ids) -> list[ItemMedia]:
        out = []
        for item_id in item_ids:
            item_id = int(item_id)
            if item_id not in self._where:
                raise DataError(f"{self.data.root}: item {item_id} is not in the item shards "
                                f"(1..{self.data.num_items})")
            shard_number, members = self._where[item_id]
            text_member = members.get("txt")
            text = self._member(shard_number, text_member).decode("utf-8", errors="replace") if text_member else ""
            image_format = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
            image = self._member(shard_number, members[image_format]) if image_format else None
            out.append(ItemMedia(item_id, text, image, image_format, self._shards[shard_number]))
        return out

    def close(self) -> None:
        for fd in self._files:
            os.close(fd)
        self._files = []
