"""The extract stage: store shapes and masks, determinism, fingerprint reuse/rebuild, DALI vs PIL,
bad media, and 2-process extraction equal to 1-process."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from wds2idx import IndexCreator

from conftest import jpeg_bytes, toy_interactions, toy_items, write_recbole
from data_shards.checksum import sha256_file
from data_shards.features.extract import ExtractOptions, extract_features
from data_shards.features.store import open_store
from data_shards.prepare import PrepareOptions, prepare
from data_shards.reader import PreparedDataset
from data_shards.sources.recbole import read_recbole

ROOT = Path(__file__).resolve().parents[1]


def _image(mode: str, size=(40, 30), fmt="JPEG", colour=(180, 40, 90)) -> bytes:
    buffer = io.BytesIO()
    picture = Image.new("RGB", size, colour).convert(mode)
    if mode == "RGBA":
        picture.putalpha(128)
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


ODD_IMAGES = {  # decodable but unusual: each must be encoded like any other
    "i0": jpeg_bytes((200, 30, 30)),
    "i1": _image("L"),  # grayscale
    "i2": _image("CMYK"),
    "i3": _image("RGBA", fmt="PNG"),  # PNG with alpha
    "i4": _image("RGB", size=(3, 2)),  # tiny
    "i5": _image("RGB", size=(1600, 1200)),  # large
}


def _dataset(tmp_path, name="data", items=None, images=ODD_IMAGES):
    items = items or toy_items()
    folder = write_recbole(tmp_path / f"{name}-src", toy_interactions(), items)
    (folder / "images").mkdir()
    for key, data in images.items():
        suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
        (folder / "images" / f"{key}.{suffix}").write_bytes(data)
    prepare(read_recbole(folder), tmp_path / name, PrepareOptions(k_core=3, shard_max_items=4))
    return tmp_path / name


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


def _options(cache, **overrides):
    return ExtractOptions(batch_size=4, encoder_cache=cache, **overrides)


def _rows(root, modality):
    data = PreparedDataset(root, verify=False)
    store = open_store(data, modality)
    by_original = {item.original_id: item.item_id for item in data.items()}
    return store, by_original


def test_store_shapes_masks_and_odd_images(tmp_path, encoder_cache, capsys):
    root = _dataset(tmp_path)
    stores = extract_features(root, _options(encoder_cache))
    text, image = stores["text"], stores["image"]
    assert text.features.shape == (9, 384) and image.features.shape == (9, 384)
    assert text.features.dtype == np.float16
    assert not text.mask[0] and not image.mask[0] and not np.any(text.features[0])
    _, ids = _rows(root, "image")
    with_image = {ids[key] for key in ODD_IMAGES}
    assert {i for i in range(1, 9) if image.mask[i]} == with_image
    assert text.mask[1:].all()
    vectors = np.asarray(image.features[sorted(with_image)], dtype=np.float32)
    assert np.isfinite(vectors).all() and (np.linalg.norm(vectors, axis=1) > 1).all()
    assert not np.any(image.features[[i for i in range(1, 9) if i not in with_image]])
    out = capsys.readouterr().out
    assert "2 of 8 items without usable image" in out and "0 of 8 items without usable text" in out


def test_reuse_rebuild_and_partial_stores(tmp_path, encoder_cache, capsys):
    root = _dataset(tmp_path)
    first = extract_features(root, _options(encoder_cache))
    first_text = np.array(first["text"].features)
    capsys.readouterr()
    extract_features(root, _options(encoder_cache))
    assert capsys.readouterr().out.count("reusing") == 2
    # a different preprocessing/encoder identity is a different fingerprint -> rebuilt
    meta_path = root / "features" / "text" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    extract_features(root, _options(encoder_cache, modalities=("text",)))
    assert "reusing" not in capsys.readouterr().out
    # an interrupted run leaves no store.json: never taken for complete
    (root / "features" / "text" / "store.json").unlink()
    assert open_store(PreparedDataset(root, verify=False), "text") is None
    rebuilt = extract_features(root, _options(encoder_cache, modalities=("text",)))
    assert np.array_equal(np.array(rebuilt["text"].features), first_text)  # deterministic


def test_image_size_is_part_of_the_store_fingerprint(tmp_path, encoder_cache, capsys):
    root = _dataset(tmp_path)
    full = np.array(extract_features(root, _options(encoder_cache, modalities=("image",)))["image"].features)
    capsys.readouterr()
    small = extract_features(root, _options(encoder_cache, modalities=("image",), image_size=112))["image"]
    assert "reusing" not in capsys.readouterr().out
    assert small.meta["preprocessing"]["crop"] == 112 and "image_size=112" in small.meta["encoder"]
    rows = np.array(small.features)
    assert rows.shape == full.shape and np.array_equal(rows.any(axis=1), full.any(axis=1))
    assert not np.array_equal(rows, full)
    with pytest.raises(ValueError, match="image_size=100 must be a positive multiple of the patch size 14"):
        extract_features(root, _options(encoder_cache, modalities=("image",), image_size=100, force=True))


def test_pil_fallback_matches_dali(tmp_path, encoder_cache):
    root = _dataset(tmp_path)
    dali = np.array(extract_features(root, _options(encoder_cache, modalities=("image",),
                                                    image_reader="dali"))["image"].features, dtype=np.float32)
    pil = np.array(extract_features(root, _options(encoder_cache, modalities=("image",), image_reader="pil",
                                                   force=True))["image"].features, dtype=np.float32)
    rows = [i for i in range(1, 9) if np.any(dali[i])]
    cosine = (dali[rows] * pil[rows]).sum(1) / np.linalg.norm(dali[rows], axis=1) / np.linalg.norm(pil[rows], axis=1)
    assert len(rows) == 6 and cosine.min() > 0.97, cosine


def _corrupt_item_image(root: Path, original_id: str, payload: bytes) -> None:
    """Replace one item's image bytes inside its shard (as a foreign shard writer could), re-index it
    for DALI and re-stamp the manifest, so only the extract stage can notice."""
    manifest = json.loads((root / "manifest.json").read_text())
    data = PreparedDataset(root, verify=False)
    item_id = next(item.item_id for item in data.items() if item.original_id == original_id)
    for entry in manifest["shards"]["items"]:
        path = root / entry["file"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name.startswith(f"{item_id:010d}.") for m, _ in members):
            continue
        with tarfile.open(path, "w") as tar:
            for member, content in members:
                if member.name == f"{item_id:010d}.jpg":
                    content = payload
                    member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
        with IndexCreator(str(path), str(root / entry["dali_index"]), verbose=False) as creator:
            creator.create_index()
        entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("reader", ["pil", "dali"])
def test_bad_bytes_in_a_shard_are_masked_and_never_shift_rows(tmp_path, encoder_cache, reader, capsys):
    clean = _dataset(tmp_path, "clean")
    broken = _dataset(tmp_path, "broken")
    _corrupt_item_image(broken, "i0", b"\xff\xd8\xff garbage that is not a jpeg")
    _corrupt_item_image(broken, "i5", _image("RGB", size=(1600, 1200))[:900])  # truncated
    options = _options(encoder_cache, modalities=("image",), image_reader=reader)
    clean_store = extract_features(clean, options)["image"]
    broken_store = extract_features(broken, options)["image"]
    out = capsys.readouterr().out
    assert "bad_image_masked: 2" in out
    _, clean_ids = _rows(clean, "image")
    _, broken_ids = _rows(broken, "image")
    assert not broken_store.mask[broken_ids["i0"]] and not broken_store.mask[broken_ids["i5"]]
    for key in ("i1", "i2", "i3", "i4"):
        assert broken_store.mask[broken_ids[key]]
        np.testing.assert_allclose(np.asarray(broken_store.features[broken_ids[key]], dtype=np.float32),
                                   np.asarray(clean_store.features[clean_ids[key]], dtype=np.float32),
                                   atol=2e-2 if reader == "dali" else 0)


def test_two_process_extraction_equals_one_process(tmp_path, encoder_cache):
    one = _dataset(tmp_path, "one")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    single = extract_features(one, _options(encoder_cache))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "launch.cli", "extract", "--data", str(two), "--batch-size", "4",
                           "--encoder-cache", str(encoder_cache)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = PreparedDataset(two, verify=False)
    for modality in ("text", "image"):
        store = open_store(data, modality)
        assert np.array_equal(store.mask, single[modality].mask)
        np.testing.assert_allclose(np.asarray(store.features, dtype=np.float32),
                                   np.asarray(single[modality].features, dtype=np.float32), atol=1e-3)
