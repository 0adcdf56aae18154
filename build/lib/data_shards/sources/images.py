"""Image files on disk, looked up by an item's original id."""
from __future__ import annotations

from pathlib import Path

from data_shards.raw import RawImage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageFolder:
    """``<folder>/<item id><suffix>``; the listing is read once so lookups cost no syscalls."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._files: dict[str, Path] = {}
        if folder is None:
            return
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                self._files.setdefault(path.stem, path)

    def __len__(self) -> int:
        return len(self._files)

    def __call__(self, item_id: str) -> RawImage | None:
        path = self._files.get(item_id)
        if path is None:
            return None
        return RawImage(data=path.read_bytes(), origin=str(path))
