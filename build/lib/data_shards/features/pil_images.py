"""The fallback image path without DALI: webdataset + PIL, same preprocessing as the DALI graph.

Decoding runs in a pool of worker processes (one per core by default) fed with raw bytes read from
the shards in order; workers return uint8 crops and normalisation happens batched in torch.
"""
from __future__ import annotations

import io
import os
from multiprocessing import get_context
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data_shards.features.preprocess import ImagePreprocessing
from data_shards.reader import PreparedDataset


def crop_image(data: bytes, prep: ImagePreprocessing) -> np.ndarray:
    """Bytes -> [crop, crop, 3] uint8 (shorter side resized, centre crop); ValueError if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"undecodable image ({type(err).__name__}: {err})") from err
    width, height = image.size
    scale = prep.resize_shorter / min(width, height)
    size = (max(prep.crop, round(width * scale)), max(prep.crop, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - prep.crop) // 2, (size[1] - prep.crop) // 2
    return np.asarray(image.crop((left, top, left + prep.crop, top + prep.crop)), dtype=np.uint8)


def _crop_or_reason(job: tuple[bytes, ImagePreprocessing]) -> np.ndarray | str:
    try:
        return crop_image(*job)
    except ValueError as err:
        return str(err)


def normalise(crops: np.ndarray, prep: ImagePreprocessing) -> torch.Tensor:
    """[n, H, W, 3] uint8 -> [n, 3, H, W] float32, scaled to [0, 1] then normalised."""
    pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


def rank_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's split of ``count`` samples into ``world_size`` contiguous parts."""
    return count * rank // world_size, count * (rank + 1) // world_size


def pil_image_batches(data: PreparedDataset, prep: ImagePreprocessing, batch_size: int, rank: int = 0,
                      world_size: int = 1, workers: int | None = None,
                      on_bad_image: Callable[[int, str], None] | None = None
                      ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (item ids, pixels [n, 3, crop, crop]) for this rank's share of the images: the same
    contiguous range DALI's ``shard_id``/``num_shards`` gives it, so both paths split work alike.
    Undecodable bytes are reported through ``on_bad_image(item_id, reason)`` and left out."""
    start, stop = rank_range(data.manifest["num_items_with_image"], rank, world_size)
    with_image = (item for item in data.items() if item.image is not None)
    images = ((item.item_id, item.image) for position, item in enumerate(with_image) if start <= position < stop)
    workers = workers or len(os.sched_getaffinity(0))
    with get_context("spawn").Pool(workers) as pool:
        ids_and_bytes = iter(images)
        while True:
            chunk = [pair for _, pair in zip(range(batch_size), ids_and_bytes)]
            if not chunk:
                return
            results = pool.map(_crop_or_reason, [(image, prep) for _, image in chunk], chunksize=8)
            ids, crops = [], []
            for (item_id, _), result in zip(chunk, results):
                if isinstance(result, str):
                    if on_bad_image is None:
                        raise ValueError(f"item {item_id}: {result}")
                    on_bad_image(item_id, result)
                else:
                    ids.append(item_id)
                    crops.append(result)
            if ids:
                yield np.asarray(ids), normalise(np.stack(crops), prep)
