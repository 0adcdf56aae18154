"""Checking image bytes before they go into a shard: decodable, and in a format DALI can decode."""
from __future__ import annotations

import io
import warnings

from PIL import Image

# PIL format name -> shard member extension (the extension is what readers dispatch on).
SHARD_IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
IMAGE_EXTENSIONS = tuple(SHARD_IMAGE_EXTENSIONS.values())


class UnusableImage(ValueError):
    """The bytes are not an image a reader can decode; the message says why."""


def image_extension(data: bytes) -> str:
    """Fully decode ``data`` (catching truncation) and return its shard extension."""
    if not data:
        raise UnusableImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                kind = image.format
                width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as err:
        raise UnusableImage(f"cannot be decoded ({type(err).__name__}: {err})") from err
    if kind not in SHARD_IMAGE_EXTENSIONS:
        raise UnusableImage(f"format {kind} is not one of {sorted(SHARD_IMAGE_EXTENSIONS)}")
    if width < 2 or height < 2:
        raise UnusableImage(f"{width}x{height} pixels is too small to be an image")
    return SHARD_IMAGE_EXTENSIONS[kind]
