"""Items chosen by id -> encoder-ready inputs: their raw media read from the shards by offset (`ItemMediaReader`),
images decoded and preprocessed as `extract` does (DALI or PIL, `image_decoding`), texts tokenized by the text
encoder's tokenizer. No encoder runs here: this is the CPU half of a stream-mode step, done ahead of the step in a
background thread.

Items without a usable input are masked, never shifted, and reported once each through `on_problem(kind, item id,
shard, detail)`: `image_missing` (no image in the shard: counted, not an error), `bad_image_masked` (empty bytes or
bytes the decoder rejects; skipped from then on, so a bad image costs one failed decode per run), `empty_text_masked`,
`text_truncated` (longer than the encoder's max_length: cut there, the item keeps its text).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from data_shards.features.encoders import TokenizedTexts
from data_shards.item_media import ItemMediaReader

ProblemReport = Callable[[str, int, str, str], None]


@dataclass
class MediaBatch:
    """ids [U] ascending; `text_rows` / `image_rows`: positions in ids of the items with a usable text / image, in
    the order of `texts` (the token batches' input positions index text_rows) and `pixels` [k, 3, S, S]."""
    ids: np.ndarray
    texts: TokenizedTexts | None = None
    text_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pixels: torch.Tensor | None = None
    image_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seconds: dict[str, float] = field(default_factory=dict)  # read / decode / tokenize


class MediaBatcher:
    """`batch(ids)` -> MediaBatch. `text_encoder` / `decoder` None: that modality is not prepared."""

    def __init__(self, reader: ItemMediaReader, text_encoder=None, decoder=None, text_batch_size: int = 64,
                 on_problem: ProblemReport | None = None):
        self.reader, self.text_encoder, self.decoder = reader, text_encoder, decoder
        self.text_batch_size = text_batch_size
        self.on_problem = on_problem or (lambda kind, item, shard, detail: None)
        self.masked_images: set[int] = set()
        self.reported: set[tuple[str, int]] = set()

    def _report(self, kind: str, item_id: int, shard: str, detail: str) -> None:
        if (kind, item_id) not in self.reported:
            self.reported.add((kind, item_id))
            self.on_problem(kind, item_id, shard, detail)

    def batch(self, ids: np.ndarray) -> MediaBatch:
        ids = np.asarray(ids, dtype=np.int64)
        out = MediaBatch(ids)
        if self.text_encoder is None and self.decoder is None:
            return out  # nothing of these items is encoded here
        real = np.flatnonzero(ids > 0)  # id 0 is padding: no media, a zero row
        started = time.perf_counter()
        media = self.reader.read(ids[real])
        out.seconds["read"] = time.perf_counter() - started
        if self.decoder is not None:
            self._images(out, real, media)
        if self.text_encoder is not None:
            self._texts(out, real, media)
        return out

    def _images(self, out: MediaBatch, real: np.ndarray, media) -> None:
        started = time.perf_counter()
        rows, images = [], []
        for position, item in zip(real, media):
            if item.image is None:
                self._report("image_missing", item.item_id, item.shard, "no image in the shard")
            elif item.item_id in self.masked_images:
                continue
            elif not item.image:
                self._mask_image(item, "empty image")
            else:
                rows.append(position)
                images.append(item.image)
        decoded = self.decoder.decode(images)
        for index, reason in decoded.reasons.items():
            self._mask_image(media[int(np.searchsorted(real, rows[index]))], reason)
        out.image_rows = np.asarray(rows, dtype=np.int64)[decoded.ok]
        out.pixels = decoded.pixels
        out.seconds["decode"] = time.perf_counter() - started

    def _mask_image(self, item, reason: str) -> None:
        self.masked_images.add(item.item_id)
        self._report("bad_image_masked", item.item_id, item.shard, reason)

    def _texts(self, out: MediaBatch, real: np.ndarray, media) -> None:
        started = time.perf_counter()
        rows, texts = [], []
        for position, item in zip(real, media):
            if item.text.strip():
                rows.append(position)
                texts.append(item.text)
            else:
                self._report("empty_text_masked", item.item_id, item.shard, "empty text")
        out.texts = self.text_encoder.tokenize(texts, self.text_batch_size)
        out.text_rows = np.asarray(rows, dtype=np.int64)
        limit = self.text_encoder.max_length
        for index in np.flatnonzero(out.texts.truncated):
            item = media[int(np.searchsorted(real, rows[index]))]
            self._report("text_truncated", item.item_id, item.shard, f"longer than {limit} tokens, cut there")
        out.seconds["tokenize"] = time.perf_counter() - started
