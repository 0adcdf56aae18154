"""Item images from the shards through a DALI pipeline: read, decode (nvJPEG "mixed" on a GPU,
CPU otherwise), resize, crop, normalise. Items without an image are skipped by the reader."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from data_shards.features.preprocess import ImagePreprocessing
from data_shards.media import IMAGE_EXTENSIONS
from data_shards.reader import PreparedDataset


def _item_ids(source_info: torch.Tensor) -> np.ndarray:
    """source_info is "<shard path>:<offset>:<key>.<ext>" as padded bytes; the key is the item id."""
    ids = []
    for row in source_info.numpy().astype(np.uint8):
        text = bytes(row).rstrip(b"\0").decode()
        ids.append(int(text.rsplit(":", 1)[1].split(".", 1)[0]))
    return np.asarray(ids, dtype=np.int64)


def dali_image_batches(data: PreparedDataset, prep: ImagePreprocessing, batch_size: int, rank: int = 0,
                       world_size: int = 1, num_threads: int = 2,
                       device_id: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield (item ids, pixels [n, 3, crop, crop] float32) for this rank's share of the samples
    (DALI ``shard_id``/``num_shards``). ``device_id`` set -> GPU decoding and GPU tensors."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    entries = data.manifest["shards"]["items"]
    paths = [str(data.root / entry["file"]) for entry in entries]
    indexes = [str(data.root / entry["dali_index"]) for entry in entries]
    if data.manifest["num_items_with_image"] == 0:
        return

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def pipeline():
        encoded = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=[";".join(IMAGE_EXTENSIONS)],
                                        missing_component_behavior="skip", shard_id=rank,
                                        num_shards=world_size, name="items")
        info = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_shorter=prep.resize_shorter, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(images, crop=(prep.crop, prep.crop), dtype=types.FLOAT,
                                          output_layout="CHW", mean=[255 * m for m in prep.mean],
                                          std=[255 * s for s in prep.std])
        return images, info

    pipe = pipeline()
    pipe.build()
    batches = DALIGenericIterator(pipe, ["pixels", "info"], reader_name="items",
                                  last_batch_policy=LastBatchPolicy.PARTIAL)
    for batch in batches:
        yield _item_ids(batch[0]["info"]), batch[0]["pixels"]


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


