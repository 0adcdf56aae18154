"""Stream mode (`features.mode=stream`): item images and texts come from the shards by id and go through the
encoders inside the training step, instead of a feature store built beforehand.

Per global step, each rank needs the media of its unique item ids: its sequences' items, its scored targets and the
step's shared negatives. A background thread reads, decodes (DALI) and tokenizes them for step k+1 while step k
computes (`prefetched`); the encoders run in the step, on the rank's device (bf16 autocast on GPU), and their
vectors feed the model through `StepFeatures.rows`, exactly where cached mode reads its tables.

Evaluation (and the feature statistics before training) encode the whole catalogue: each rank its contiguous part,
in chunks, then all ranks gather the tables, so ranking is the same code as in cached mode.

Items without a usable image or text are masked (a zero row, as in a feature store) and counted once per run;
`problems()` gathers what every rank met (the run's metrics.json `media_problems`).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data_shards.features.encoders import load_image_encoder, load_text_encoder
from data_shards.features.image_decoding import image_decoder
from data_shards.features.media_batches import MediaBatch, MediaBatcher
from data_shards.features.preprocess import ImagePreprocessing
from data_shards.item_media import ItemMediaReader
from data_shards.problems import ProblemLog
from data_shards.reader import PreparedDataset
from train.distributed import all_gather_objects
from train.items import ItemInputs
from train.monitor import progress_bar


@dataclass
class StepFeatures:
    """The encoded media of one step's item ids (ascending, 0 = padding with zero rows) and the catalogue's category
    labels: what `train.step.model_inputs` and the sampled loss read."""
    ids: torch.Tensor
    text: torch.Tensor | None
    image: torch.Tensor | None
    categories: torch.Tensor | None
    has_category: torch.Tensor | None

    def rows(self, modality: str, ids: torch.Tensor) -> torch.Tensor | None:
        table = self.text if modality == "text" else self.image
        if table is None:
            return None
        return table[torch.searchsorted(self.ids, ids)]


def prefetched(steps, prepare, depth: int):
    """Yield (item, prepare(item)) for each item of `steps`, with up to `depth` items prepared ahead in a thread
    (0: in the caller's thread)."""
    if depth == 0:
        for item in steps:
            yield item, prepare(item)
        return
    pool, pending = ThreadPoolExecutor(1, thread_name_prefix="media-prefetch"), deque()
    try:
        for item in steps:
            pending.append((item, pool.submit(prepare, item)))
            if len(pending) > depth:
                ready, future = pending.popleft()
                yield ready, future.result()
        while pending:
            ready, future = pending.popleft()
            yield ready, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class MediaStream:
    def __init__(self, data: PreparedDataset, modalities: tuple[str, ...], data_cfg, features_cfg,
                 device: torch.device, rank: int, world_size: int):
        self.data, self.device, self.rank, self.world = data, device, rank, world_size
        self.cfg = features_cfg
        self.text_encoder = self.image_encoder = decoder = None
        if "text" in modalities:
            self.text_encoder = load_text_encoder(data_cfg.text_encoder, device=device)
        if "image" in modalities:
            self.image_encoder = load_image_encoder(data_cfg.image_encoder, image_size=data_cfg.image_size or None,
                                                    device=device)
            prep = ImagePreprocessing.for_encoder(self.image_encoder.image_size, self.image_encoder.mean,
                                                  self.image_encoder.std)
            decoder = image_decoder(features_cfg.image_decoder, prep, features_cfg.encode_batch_size,
                                    features_cfg.decode_threads, device)
        self.decoder_name = None if decoder is None else decoder.name
        self.found: dict[str, dict[int, str]] = {}  # kind -> item id -> "shard: detail", this rank's
        self.batcher = MediaBatcher(ItemMediaReader(data), self.text_encoder, decoder,
                                    features_cfg.encode_batch_size, self._found)
        self.totals = {"images": 0, "texts": 0, "read": 0.0, "decode": 0.0, "tokenize": 0.0, "encode": 0.0}

    def _found(self, kind: str, item_id: int, shard: str, detail: str) -> None:
        self.found.setdefault(kind, {})[item_id] = f"{shard}: {detail}"
        if kind == "bad_image_masked":
            print(f"[rank {self.rank}] item {item_id} ({shard}): image masked for the rest of the run: {detail}",
                  flush=True)

    @property
    def text_dim(self) -> int:
        return 0 if self.text_encoder is None else self.text_encoder.dim

    @property
    def image_dim(self) -> int:
        return 0 if self.image_encoder is None else self.image_encoder.dim

    def describe(self) -> str:
        parts = [f"{m} encoder in the step ({e.identity.split('|')[0]})" for m, e in
                 (("text", self.text_encoder), ("image", self.image_encoder)) if e is not None]
        reader = f", images decoded by {self.decoder_name}" if self.decoder_name else ""
        return f"features streamed from the shards: {', '.join(parts)}{reader}, {self.cfg.prefetch} step(s) prefetched"

    # ------------------------------------------------------------------ one step
    def prepare(self, ids: torch.Tensor | np.ndarray) -> MediaBatch:
        """The CPU half of a step (thread-safe with respect to `encode`): read, decode, tokenize."""
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        return self.batcher.batch(np.unique(ids))

    def encode(self, batch: MediaBatch, items: ItemInputs) -> StepFeatures:
        """The encoders over a prepared batch, in the caller's step: [U, F] rows per modality (zero where masked)."""
        started = time.perf_counter()
        ids = torch.from_numpy(batch.ids).to(self.device)
        text = image = None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext())
        with torch.no_grad(), autocast:
            if self.text_encoder is not None:
                text = torch.zeros(len(batch.ids), self.text_dim, device=self.device)
                rows = torch.from_numpy(batch.text_rows).to(self.device)
                for positions, tokens in batch.texts.batches:
                    text[rows[positions.to(self.device)]] = self.text_encoder.pool(tokens)
                self.totals["texts"] += len(batch.text_rows)
            if self.image_encoder is not None:
                image = torch.zeros(len(batch.ids), self.image_dim, device=self.device)
                rows = torch.from_numpy(batch.image_rows).to(self.device)
                for start in range(0, len(rows), self.cfg.encode_batch_size):
                    chunk = slice(start, start + self.cfg.encode_batch_size)
                    image[rows[chunk]] = self.image_encoder.pool(batch.pixels[chunk])
                self.totals["images"] += len(batch.image_rows)
        for phase, seconds in batch.seconds.items():
            self.totals[phase] += seconds
        self.totals["encode"] += time.perf_counter() - started
        return StepFeatures(ids, text, image, items.categories, items.has_category)

    def token_states(self, batch: MediaBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Token- and patch-level encoder outputs of a prepared batch, for models that attend over them:
        {"text": (hidden [U, T, F_t], mask [U, T]), "image": (hidden [U, 1 + P, F_v], mask [U, 1 + P])}, rows in
        `batch.ids` order. Mask False (and a zero vector): a padding token, or every position of an item without that
        input."""
        out = {}
        if self.text_encoder is not None:
            width = max((tokens["input_ids"].shape[1] for _, tokens in batch.texts.batches), default=1)
            hidden = torch.zeros(len(batch.ids), width, self.text_dim, device=self.device)
            mask = torch.zeros(len(batch.ids), width, dtype=torch.bool, device=self.device)
            rows = torch.from_numpy(batch.text_rows).to(self.device)
            for positions, tokens in batch.texts.batches:
                states, present = self.text_encoder.token_states(tokens)
                target = rows[positions.to(self.device)]
                hidden[target, :states.shape[1]] = states.float() * present[..., None]  # padding tokens: zero
                mask[target, :states.shape[1]] = present
            out["text"] = (hidden, mask)
        if self.image_encoder is not None:
            rows = torch.from_numpy(batch.image_rows).to(self.device)
            states = (self.image_encoder.patch_states(batch.pixels) if len(rows) else None)
            width = states.shape[1] if states is not None else self._patches()
            hidden = torch.zeros(len(batch.ids), width, self.image_dim, device=self.device)
            mask = torch.zeros(len(batch.ids), width, dtype=torch.bool, device=self.device)
            if states is not None:
                hidden[rows] = states.float()
                mask[rows] = True
            out["image"] = (hidden, mask)
        return out

    def _patches(self) -> int:
        patch = int(self.image_encoder.model.config.patch_size)
        return 1 + (self.image_encoder.image_size // patch) ** 2

    # ------------------------------------------------------------------ the catalogue
    def catalogue(self, items: ItemInputs, progress: bool, desc: str = "encoding the catalogue") -> ItemInputs:
        """`items` with full text/image tables [N + 1, F] encoded now: this rank encodes ids in its contiguous part
        of 1..N chunk by chunk (the next chunk prepared while this one encodes), then every rank gathers all parts."""
        num = self.data.num_items
        start, stop = 1 + num * self.rank // self.world, 1 + num * (self.rank + 1) // self.world
        size = self.cfg.encode_batch_size
        chunks = [np.arange(s, min(s + size, stop)) for s in range(start, stop, size)]
        parts = {"text": [], "image": []}
        bar = progress_bar(num, desc, "item", progress)
        for ids, batch in prefetched(chunks, self.prepare, self.cfg.prefetch):
            encoded = self.encode(batch, items)
            for modality in parts:
                table = encoded.text if modality == "text" else encoded.image
                if table is not None:
                    parts[modality].append(table)
            bar.update(len(ids) * self.world)
        bar.close()
        tables = {m: self._gather(torch.cat(p) if p else self._empty(m), num) for m, p in parts.items()
                  if (self.text_encoder if m == "text" else self.image_encoder) is not None}
        return ItemInputs(tables.get("text"), tables.get("image"), items.categories, items.has_category,
                          items.category_levels)

    def _empty(self, modality: str) -> torch.Tensor:
        dim = self.text_dim if modality == "text" else self.image_dim
        return torch.zeros(0, dim, device=self.device)

    def _gather(self, part: torch.Tensor, num: int) -> torch.Tensor:
        """[N + 1, F]: row 0 zero, then every rank's contiguous part in rank order."""
        zero = part.new_zeros(1, part.shape[1])
        if self.world == 1:
            return torch.cat([zero, part])
        longest = -(-num // self.world)
        padded = torch.nn.functional.pad(part, (0, 0, 0, longest - part.shape[0]))
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded.contiguous())
        sizes = [num * (r + 1) // self.world - num * r // self.world for r in range(self.world)]
        return torch.cat([zero] + [piece[:n] for piece, n in zip(pieces, sizes)])

    def problems(self) -> dict:
        """Every rank's masked/truncated items, once each (a collective): {kind: {"count", "examples"}}."""
        merged: dict[str, dict[int, str]] = {}
        for found in all_gather_objects(self.found):
            for kind, items in found.items():
                merged.setdefault(kind, {}).update(items)
        log = ProblemLog()
        for kind in sorted(merged):
            for item_id in sorted(merged[kind]):
                log.skip(kind, f"item {item_id}", merged[kind][item_id])
        return log.as_dict()

    def close(self) -> None:
        self.batcher.reader.close()
