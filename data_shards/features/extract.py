"""The `extract` stage: item text and images -> frozen encoder features in a cached store.

Processes split the items between them (accelerate supplies rank, world size and device); each
encodes its share in batches (bf16 autocast on GPU) and rank 0 writes the gathered rows.

With `tokens`, the stores hold each item's token / patch states instead of one pooled vector (for models that
attend over them, TAME): text as [CLS] + tokens cut at `text_token_limit` (zero vectors at padding), images as
[CLS] + patches, the patch grid average-pooled to `image_token_grid` x `image_token_grid` when set (a 224-px DINOv2
has 256 patches: a 12k-item catalogue would take 2.4 GB at fp16 for every patch, 150 MB at a 4 x 4 grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm import tqdm

from data_shards.features.dali_images import dali_available, dali_image_batches
from data_shards.features.encoders import load_image_encoder, load_text_encoder
from data_shards.features.pil_images import pil_image_batches
from data_shards.features.preprocess import ImagePreprocessing
from data_shards.features.store import FeatureStore, fingerprint, open_store, store_name, write_store
from data_shards.problems import ProblemLog
from data_shards.reader import PreparedDataset

IMAGE_READERS = ("auto", "dali", "pil")


@dataclass
class ExtractOptions:
    text_encoder: str = "default"
    image_encoder: str = "default"
    image_size: int = 0  # the image encoder's input side; 0 = its own
    batch_size: int = 64
    image_reader: str = "auto"
    force: bool = False
    modalities: tuple[str, ...] = ("text", "image")
    encoder_cache: Path | None = None
    tokens: bool = False  # token / patch states instead of pooled vectors (stores "text_tokens", "image_tokens")
    text_token_limit: int = 64
    image_token_grid: int = 0  # 0: every patch

    def token_settings(self, modality: str) -> dict:
        """What a token store's contents depend on beyond the encoder (part of its fingerprint)."""
        if not self.tokens:
            return {}
        return ({"tokens": True, "text_token_limit": self.text_token_limit} if modality == "text"
                else {"tokens": True, "image_token_grid": self.image_token_grid})


@dataclass
class _Part:
    ids: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    def add(self, ids: np.ndarray, vectors: torch.Tensor) -> None:
        self.ids.append(np.asarray(ids, dtype=np.int64))
        self.vectors.append(vectors.float().cpu().numpy().astype(np.float16 if vectors.dim() == 3 else np.float32))

    def merged(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
        return np.concatenate(self.ids), _concatenate_padded(self.vectors)


def _concatenate_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Rows of [n, dim] arrays, or of [n, tokens, dim] arrays zero-padded to the longest token count."""
    arrays = [a for a in arrays if len(a)] or arrays[:1]
    if arrays[0].ndim == 2:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in arrays])


def text_token_states(encoder, texts: list[str]) -> torch.Tensor:
    """[n, T, dim] float32 last hidden states ([CLS] first), zero vectors at padding tokens, T the longest text."""
    tokenized = encoder.tokenize(texts, batch_size=len(texts))
    parts = [(positions, *encoder.token_states(tokens)) for positions, tokens in tokenized.batches]
    width = max(states.shape[1] for _, states, _ in parts)
    out = torch.zeros(len(texts), width, encoder.dim, device=encoder.device)
    for positions, states, mask in parts:
        out[positions.to(out.device), :states.shape[1]] = states.float() * mask[..., None]
    return out


def patch_token_states(encoder, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """[n, 1 + P, dim] float32: [CLS] then the patches, average-pooled to grid x grid (0: as they are)."""
    states = encoder.patch_states(pixels).float()
    if not grid:
        return states
    side = int(round((states.shape[1] - 1) ** 0.5))
    patches = states[:, 1:].transpose(1, 2).reshape(states.shape[0], -1, side, side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)
    return torch.cat([states[:, :1], pooled], dim=1)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _gather(part: _Part, dim: int) -> tuple[np.ndarray, np.ndarray]:
    pieces = gather_object([part.merged(dim)])
    ids = np.concatenate([p[0] for p in pieces])
    vectors = np.concatenate([p[1] for p in pieces])
    order = np.argsort(ids, kind="stable")
    return ids[order], vectors[order]


def _extract_text(data: PreparedDataset, encoder, options: ExtractOptions, state: PartialState,
                  problems: ProblemLog) -> tuple[np.ndarray, np.ndarray, dict]:
    part, batch_ids, batch_texts = _Part(), [], []
    shard_ids = [s for s in range(len(data.shard_paths("items"))) if s % state.num_processes == state.process_index]
    bar = tqdm(total=data.num_items, desc="text features", unit="item", disable=not state.is_main_process)

    def flush():
        with torch.inference_mode(), _autocast(state.device):
            vectors = text_token_states(encoder, batch_texts) if options.tokens else encoder.encode(batch_texts)
            part.add(np.asarray(batch_ids), vectors)
        bar.update(len(batch_ids) * state.num_processes)
        batch_ids.clear()
        batch_texts.clear()

    for item in data.items(shard_ids):
        if not item.text.strip():
            problems.skip("empty_text_masked", f"item {item.item_id}", item.original_id)
            continue
        batch_ids.append(item.item_id)
        batch_texts.append(item.text)
        if len(batch_ids) == options.batch_size:
            flush()
    if batch_ids:
        flush()
    bar.close()
    ids, vectors = _gather(part, encoder.dim)
    return ids, vectors, {"encoder": encoder.identity}


def _dali_then_pil(data, prep, options, state, problems):
    """DALI batches; if DALI cannot decode something, the rest of this rank's images go through PIL,
    which masks and counts the bad ones (DALI has no per-sample error handling)."""
    device_id = state.device.index if state.device.type == "cuda" else None
    done: set[int] = set()
    try:
        for ids, pixels in dali_image_batches(data, prep, options.batch_size, state.process_index,
                                              state.num_processes, device_id=device_id):
            done.update(ids.tolist())
            yield ids, pixels
        return
    except RuntimeError as err:
        problems.skip("dali_decode_failed_rest_via_pil", f"rank {state.process_index}", str(err).splitlines()[0])
    for ids, pixels in _pil(data, prep, options, state, problems):  # the same share, as DALI splits it
        keep = np.array([i not in done for i in ids.tolist()])
        if keep.any():
            yield ids[keep], pixels[torch.from_numpy(keep)]


def _pil(data, prep, options, state, problems):
    return pil_image_batches(data, prep, options.batch_size, state.process_index, state.num_processes,
                             on_bad_image=lambda item, why: problems.skip("bad_image_masked", f"item {item}", why))


def _image_batches(data, prep, options, state, problems):
    if options.image_reader not in IMAGE_READERS:
        raise ValueError(f"image_reader {options.image_reader!r} is not one of {IMAGE_READERS}")
    if options.image_reader == "dali" or (options.image_reader == "auto" and dali_available()):
        return "dali", _dali_then_pil(data, prep, options, state, problems)
    return "pil", _pil(data, prep, options, state, problems)


def _image_preprocessing(encoder) -> ImagePreprocessing:
    return ImagePreprocessing.for_encoder(encoder.image_size, encoder.mean, encoder.std)


def _extract_image(data: PreparedDataset, encoder, options: ExtractOptions, state: PartialState,
                   problems: ProblemLog) -> tuple[np.ndarray, np.ndarray, dict]:
    prep = _image_preprocessing(encoder)
    reader, batches = _image_batches(data, prep, options, state, problems)
    part = _Part()
    bar = tqdm(total=data.manifest["num_items_with_image"], desc=f"image features ({reader})", unit="image",
               disable=not state.is_main_process)
    for ids, pixels in batches:
        pixels = pixels.to(state.device, non_blocking=True)
        with torch.inference_mode(), _autocast(state.device):
            vectors = (patch_token_states(encoder, pixels, options.image_token_grid) if options.tokens
                       else encoder.encode(pixels))
            part.add(ids, vectors)
        bar.update(len(ids) * state.num_processes)
    bar.close()
    ids, vectors = _gather(part, encoder.dim)
    return ids, vectors, {"encoder": encoder.identity, "reader": reader, "preprocessing": prep.as_dict()}


def _load_encoder(modality: str, options: ExtractOptions, device: torch.device):
    """The encoder and the fingerprint of the store it would produce on ``data``."""
    if modality == "text":
        limit = options.text_token_limit if options.tokens else None
        return load_text_encoder(options.text_encoder, max_length=limit).to(device), options.token_settings("text")
    encoder = load_image_encoder(options.image_encoder, cache_dir=options.encoder_cache,
                                 image_size=options.image_size or None).to(device)
    return encoder, {**_image_preprocessing(encoder).as_dict(), **options.token_settings("image")}


def extract_features(data_dir: Path, options: ExtractOptions) -> dict[str, FeatureStore]:
    """Build (or reuse) the store of each modality. Returns the stores by store name; prints a summary on rank 0."""
    state = PartialState(cpu=not torch.cuda.is_available())
    data = PreparedDataset(data_dir, verify=state.is_main_process)
    stores = {}
    extractors = {"text": _extract_text, "image": _extract_image}
    for modality in options.modalities:
        name = store_name(modality, options.tokens)
        encoder, preprocessing = _load_encoder(modality, options, state.device)
        expected = fingerprint(data, encoder.identity, preprocessing)
        store = None if options.force else open_store(data, name, expected)
        if store is not None:
            if state.is_main_process:
                print(f"{name} features: reusing {store.path} (fingerprint matches)")
            stores[name] = store
            continue
        problems = ProblemLog()
        ids, vectors, meta = extractors[modality](data, encoder, options, state, problems)
        gathered = ProblemLog()
        for log in gather_object([problems]):
            gathered.merge(log)
        if state.is_main_process:
            write_store(data, name, ids, vectors, {**meta, **options.token_settings(modality),
                                                   "fingerprint": expected, "problems": gathered.as_dict()})
        state.wait_for_everyone()
        stores[name] = open_store(data, name, expected)
        if state.is_main_process:
            _print_summary(name, stores[name], data, gathered)
    return stores


def _print_summary(modality: str, store: FeatureStore, data: PreparedDataset, problems: ProblemLog) -> None:
    missing = data.num_items - int(store.mask[1:].sum())
    print(f"{modality} features: {store.path} shape {tuple(store.features.shape)} (row 0 = padding), "
          f"{missing:,} of {data.num_items:,} items without usable {modality} (masked)")
    for line in problems.summary_lines() if problems.counts else []:
        print(f"  {line}")
