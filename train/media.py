"""Content features computed in the run instead of read from a feature store: stream mode (`features.mode=stream`:
item images and texts come from the shards by id and go through the encoders inside the training step) and the
encoders' trainable parts (`features.tune`: top layers, LoRA adapters, side adapters; train.encoder_tuning).

Per global step, each rank needs the media of its unique item ids: its sequences' items, its scored targets and the
step's shared negatives. A background thread reads, decodes (DALI) and tokenizes them for step k+1 while step k
computes (`prefetched`); the step turns them into [U, F] rows per modality (train.modality_paths) and the model reads
them through `StepFeatures.rows`, exactly where cached mode reads its tables.

Evaluation (and the feature statistics before training) encode the whole catalogue with the encoders as they are at
that round: each rank its contiguous part, in chunks (as many on every rank: ZeRO-3 gathers a trained encoder's
parameters in lockstep), then all ranks gather the tables, so ranking is the same code as in cached mode.

Items without a usable image or text are masked (a zero row, as in a feature store) and counted once per run;
`problems()` gathers what every rank met (the run's metrics.json `media.problems`).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace

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
from train.encoder_tuning import make_trainable, tune_mode
from train.items import ItemInputs
from train.modality_paths import EncoderPath, SideAdapterPath
from train.monitor import progress_bar

ONE_BATCH = 2 ** 31  # token batch size of a trained text encoder: one call per step (modality_paths)


@dataclass
class StepFeatures:
    """The feature rows of one step's item ids (ascending, 0 = padding with zero rows) and the catalogue's category
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


def computed_modalities(cfg, uses: set[str]) -> tuple[str, ...]:
    """The content modalities (text, image) a run computes itself instead of reading a feature store: every one it
    uses in stream mode, else those with a side adapter."""
    content = tuple(m for m in ("text", "image") if m in uses)
    if cfg.features.mode == "stream":
        return content
    return tuple(m for m in content if tune_mode(cfg.features, m) == "side_adapter")


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class MediaStream:
    """The content modalities `modalities` ("text", "image") computed in the run: encoded in the step, or (side
    adapter) read from per-layer states encoded once. `seed` seeds the trainable parts' initialisation."""

    def __init__(self, data: PreparedDataset, modalities: tuple[str, ...], data_cfg, features_cfg,
                 device: torch.device, rank: int, world_size: int, seed: int = 0):
        self.data, self.device, self.rank, self.world = data, device, rank, world_size
        self.cfg = features_cfg
        self.paths: dict[str, EncoderPath | SideAdapterPath] = {}
        encoders = {}
        if "text" in modalities:
            encoders["text"] = load_text_encoder(data_cfg.text_encoder, device=device)
        if "image" in modalities:
            encoders["image"] = load_image_encoder(data_cfg.image_encoder, image_size=data_cfg.image_size or None,
                                                   device=device)
        for modality, encoder in encoders.items():
            mode = tune_mode(features_cfg, modality)
            torch.manual_seed(seed)  # LoRA and side-adapter weights: the same on every rank, for every world size
            if mode == "side_adapter":
                self.paths[modality] = SideAdapterPath(modality, encoder, features_cfg.side_bottleneck)
                continue
            if mode != "frozen":
                make_trainable(encoder.model, mode, features_cfg.tune_layers, features_cfg.lora_rank,
                               features_cfg.lora_alpha)
                encoder.set_trainable(True)
                if features_cfg.activation_checkpointing:
                    encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.paths[modality] = EncoderPath(modality, encoder, mode != "frozen", features_cfg.encode_batch_size)
        decoder = None
        if "image" in encoders:
            image = encoders["image"]
            prep = ImagePreprocessing.for_encoder(image.image_size, image.mean, image.std)
            decoder = image_decoder(features_cfg.image_decoder, prep, features_cfg.encode_batch_size,
                                    features_cfg.decode_threads, device)
        self.decoder_name = None if decoder is None else decoder.name
        self.found: dict[str, dict[int, str]] = {}  # kind -> item id -> "shard: detail", this rank's
        reader = ItemMediaReader(data)

        def batcher(wanted: set[str]) -> MediaBatcher:
            text = encoders.get("text") if "text" in wanted else None
            text_trains = text is not None and getattr(self.paths["text"], "trains", False)
            return MediaBatcher(reader, text, decoder if "image" in wanted else None,
                                ONE_BATCH if text_trains else features_cfg.encode_batch_size, self._found)

        # per step: the modalities whose encoder runs in the step; once per run: the side adapters' backbones
        self.step_batcher = batcher({m for m, p in self.paths.items() if p.needs_media})
        self.states_batcher = batcher({m for m, p in self.paths.items() if isinstance(p, SideAdapterPath)})
        self.reader = reader
        self.totals = {"images": 0, "texts": 0, "read": 0.0, "decode": 0.0, "tokenize": 0.0, "encode": 0.0}

    def _found(self, kind: str, item_id: int, shard: str, detail: str) -> None:
        self.found.setdefault(kind, {})[item_id] = f"{shard}: {detail}"
        if kind == "bad_image_masked":
            print(f"[rank {self.rank}] item {item_id} ({shard}): image masked for the rest of the run: {detail}",
                  flush=True)

    def dim(self, modality: str) -> int:
        return self.paths[modality].dim if modality in self.paths else 0

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose parameters train with the recommender (they join the DeepSpeed engine)."""
        modules = {}
        for modality, path in self.paths.items():
            if isinstance(path, SideAdapterPath):
                modules[f"{modality}_side"] = path.side
            elif path.trains:
                modules[modality] = path.encoder
        return modules

    def describe(self) -> str:
        parts = []
        for modality, path in self.paths.items():
            mode = tune_mode(self.cfg, modality)
            name = path.encoder.identity.split("|")[0]
            if isinstance(path, SideAdapterPath):
                parts.append(f"{modality}: side adapter over {name}'s per-layer states ({path.memory_mb():.0f} MB)")
            else:
                parts.append(f"{modality}: {name} in the step, {mode}")
        reader = f"; images decoded by {self.decoder_name}" if self.decoder_name and self.step_batcher.decoder else ""
        return (f"content features computed in the run ({'; '.join(parts)}{reader}, "
                f"{self.cfg.prefetch} step(s) prefetched)")

    # ------------------------------------------------------------------ one step
    def prepare(self, ids: torch.Tensor | np.ndarray) -> MediaBatch:
        """The CPU half of a step (thread-safe with respect to `encode`): read, decode, tokenize."""
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        return self.step_batcher.batch(np.unique(ids))

    def encode(self, batch: MediaBatch, items: ItemInputs, training: bool = False) -> StepFeatures:
        """A prepared batch's [U, F] rows per modality (zero where masked), in the caller's step; with gradients into
        the trained parts when `training`. Modalities this stream does not compute come from `items`' tables."""
        started = time.perf_counter()
        ids = torch.from_numpy(batch.ids).to(self.device)
        rows = {}
        with _autocast(self.device):
            for modality in ("text", "image"):
                if modality in self.paths:
                    rows[modality] = self.paths[modality].rows(batch, ids, training)
                else:
                    rows[modality] = items.rows(modality, ids)
        self.totals["texts"] += len(batch.text_rows) if batch.texts is not None else 0
        self.totals["images"] += len(batch.image_rows) if batch.pixels is not None else 0
        for phase, seconds in batch.seconds.items():
            self.totals[phase] += seconds
        self.totals["encode"] += time.perf_counter() - started
        return StepFeatures(ids, rows["text"], rows["image"], items.categories, items.has_category)

    def token_states(self, batch: MediaBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Token- and patch-level encoder outputs of a prepared batch, for models that attend over them:
        {"text": (hidden [U, T, F_t], mask [U, T]), "image": (hidden [U, 1 + P, F_v], mask [U, 1 + P])}, rows in
        `batch.ids` order. Mask False (and a zero vector): a padding token, or every position of an item without that
        input."""
        out = {}
        device = self.device
        if "text" in self.paths:
            encoder = self.paths["text"].encoder
            width = max((tokens["input_ids"].shape[1] for _, tokens in batch.texts.batches), default=1)
            hidden = torch.zeros(len(batch.ids), width, encoder.dim, device=device)
            mask = torch.zeros(len(batch.ids), width, dtype=torch.bool, device=device)
            rows = torch.from_numpy(batch.text_rows).to(device)
            for positions, tokens in batch.texts.batches:
                states, present = encoder.token_states(tokens)
                target = rows[positions.to(device)]
                hidden[target, :states.shape[1]] = states.float() * present[..., None]  # padding tokens: zero
                mask[target, :states.shape[1]] = present
            out["text"] = (hidden, mask)
        if "image" in self.paths:
            encoder = self.paths["image"].encoder
            rows = torch.from_numpy(batch.image_rows).to(device)
            states = encoder.patch_states(batch.pixels) if len(rows) else None
            patches = 1 + (encoder.image_size // int(encoder.model.config.patch_size)) ** 2
            hidden = torch.zeros(len(batch.ids), patches, encoder.dim, device=device)
            mask = torch.zeros(len(batch.ids), patches, dtype=torch.bool, device=device)
            if states is not None:
                hidden[rows] = states.float()
                mask[rows] = True
            out["image"] = (hidden, mask)
        return out

    # ------------------------------------------------------------------ the catalogue
    def _my_chunks(self) -> list[np.ndarray]:
        """This rank's contiguous part of ids 1..N in chunks, padded with one-item dummy chunks (id 1) to the
        largest chunk count of any rank, so every rank calls the encoders as often."""
        num, size = self.data.num_items, self.cfg.encode_batch_size
        start, stop = 1 + num * self.rank // self.world, 1 + num * (self.rank + 1) // self.world
        chunks = [np.arange(s, min(s + size, stop)) for s in range(start, stop, size)]
        count = torch.tensor([len(chunks)], device=self.device)
        if self.world > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return chunks + [np.array([1])] * (int(count) - len(chunks))

    def _catalogue_pass(self, encode, batcher: MediaBatcher, progress: bool, desc: str) -> list[torch.Tensor]:
        """`encode(batch, ids)` -> a tensor per chunk of this rank's part (dummy chunks dropped)."""
        num = self.data.num_items
        mine = 1 + num * (self.rank + 1) // self.world - (1 + num * self.rank // self.world)
        parts, done = [], 0
        bar = progress_bar(num, desc, "item", progress)
        for ids, batch in prefetched(self._my_chunks(), batcher.batch, self.cfg.prefetch):  # chunks: sorted, unique
            out = encode(batch, torch.from_numpy(batch.ids).to(self.device))
            if done < mine:
                parts.append(out)
                done += len(ids)
                bar.update(len(ids) * self.world)
        bar.close()
        return parts

    def fit_side_states(self, progress: bool) -> None:
        """The side adapters' inputs: the frozen backbone's per-layer states of every item, encoded once."""
        sides = {m: p for m, p in self.paths.items() if isinstance(p, SideAdapterPath)}
        for modality, path in sides.items():
            def encode(batch, ids, path=path):
                with _autocast(self.device):
                    return path.layer_states(batch, ids).flatten(1)
            parts = self._catalogue_pass(encode, self.states_batcher, progress, f"{modality} layer states")
            layers = path.side.num_layers + 1
            flat = self._gather(torch.cat(parts) if parts else torch.zeros(0, layers * path.dim, device=self.device))
            path.states = flat.reshape(-1, layers, path.dim).to(torch.float16)

    def catalogue(self, items: ItemInputs, progress: bool, desc: str = "encoding the catalogue") -> ItemInputs:
        """`items` with full text/image tables [N + 1, F] computed now by the current encoders (eval mode, no
        gradients): this rank its contiguous part of 1..N chunk by chunk, then every rank gathers all parts."""
        modules = self.trained_modules().values()
        was_training = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                parts = self._catalogue_pass(lambda batch, ids: self.encode(batch, items), self.step_batcher,
                                             progress, desc)
        finally:
            for module, mode in zip(modules, was_training):
                module.train(mode)
        tables = {}
        for modality in ("text", "image"):
            if modality in self.paths:
                rows = [getattr(part, modality) for part in parts]
                empty = torch.zeros(0, self.dim(modality), device=self.device)
                tables[modality] = self._gather(torch.cat(rows) if rows else empty)
            else:
                tables[modality] = getattr(items, modality)
        return replace(items, text=tables["text"], image=tables["image"])

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        """[N + 1, F]: row 0 zero, then every rank's contiguous part in rank order."""
        num = self.data.num_items
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
        self.reader.close()
