"""Shard format: determinism, manifest contents, reader verification, DALI index files."""
import json
import tarfile

import numpy as np
import pytest

from conftest import jpeg_bytes, toy_interactions, toy_items, write_recbole
from data_shards.prepare import PrepareOptions, prepare
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from data_shards.sources.recbole import read_recbole


@pytest.fixture
def toy_source(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items())
    (folder / "images").mkdir()
    for k in range(0, 8, 2):
        (folder / "images" / f"i{k}.jpg").write_bytes(jpeg_bytes((30 * k, 100, 50)))
    return folder


def _prepare(folder, out, **options):
    return prepare(read_recbole(folder), out, PrepareOptions(k_core=3, shard_max_items=3, **options))


def test_rerun_gives_byte_identical_shards(toy_source, tmp_path):
    first = _prepare(toy_source, tmp_path / "a")
    second = _prepare(toy_source, tmp_path / "b")
    assert len(first["shards"]["items"]) == 3  # 8 items, 3 per shard
    for kind in ("items", "users"):
        for entry in first["shards"][kind]:
            assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()
    assert first["shards"] == second["shards"]


def test_rerun_into_same_folder_keeps_it(toy_source, tmp_path, capsys):
    _prepare(toy_source, tmp_path / "out")
    _prepare(toy_source, tmp_path / "out")
    assert "unchanged" in capsys.readouterr().out


def test_manifest_and_reader_round_trip(toy_source, tmp_path):
    manifest = _prepare(toy_source, tmp_path / "out")
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (6, 8, 36)
    assert manifest["num_items_with_image"] == 4
    for entry in manifest["shards"]["items"]:
        assert len(entry["sha256"]) == 64 and (tmp_path / "out" / entry["dali_index"]).is_file()
    data = PreparedDataset(tmp_path / "out")
    items = list(data.items())
    assert [item.item_id for item in items] == list(range(1, 9))
    with_images = {item.original_id for item in items if item.image is not None}
    assert with_images == {"i0", "i2", "i4", "i6"}
    assert all(item.image_format == "jpg" for item in items if item.image)
    by_original = {item.original_id: item for item in items}
    source_bytes = (toy_source / "images" / "i2.jpg").read_bytes()
    assert by_original["i2"].image == source_bytes  # raw bytes exactly as found
    names = data.categories["names"]
    assert {names[label] for label in by_original["i4"].labels} == {"Tools", "Tools|Widgets", "Tools|Widgets|Size1"}
    assert data.categories["levels"][names.index("Tools|Widgets|Size1")] == 2


def test_user_sequences_split_across_ranks_without_loss(toy_source, tmp_path):
    _prepare(toy_source, tmp_path / "out")
    data = PreparedDataset(tmp_path / "out")
    everyone = [s.user_id for s in data.user_sequences()]
    parts = [[s.user_id for s in data.user_sequences(rank, 4)] for rank in range(4)]
    assert sorted(sum(parts, [])) == sorted(everyone) == list(range(6))
    first = next(iter(data.user_sequences()))
    assert first.original_id == "u0" and np.all(np.diff(first.timestamps) >= 0)


def test_ties_keep_file_order_and_ids_follow_first_appearance(tmp_path):
    rows = [("a", "x", 5), ("a", "y", 5), ("a", "z", 1), ("b", "y", 2), ("b", "x", 2), ("b", "z", 3),
            ("a", "w", 9), ("b", "w", 9)]
    folder = write_recbole(tmp_path / "src", rows)
    prepare(read_recbole(folder), tmp_path / "out", PrepareOptions(k_core=1))
    data = PreparedDataset(tmp_path / "out")
    original = {item.item_id: item.original_id for item in data.items()}
    assert [original[i] for i in range(1, 5)] == ["x", "y", "z", "w"]
    sequences = {s.original_id: [original[i] for i in s.items] for s in data.user_sequences()}
    assert sequences == {"a": ["z", "x", "y", "w"], "b": ["y", "x", "z", "w"]}


def test_dali_reads_item_shards_with_their_index(toy_source, tmp_path):
    from nvidia.dali import fn, pipeline_def
    manifest = _prepare(toy_source, tmp_path / "out")
    root = tmp_path / "out"
    paths = [str(root / e["file"]) for e in manifest["shards"]["items"]]
    indexes = [str(root / e["dali_index"]) for e in manifest["shards"]["items"]]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        image, meta = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["jpg", "json"],
                                            missing_component_behavior="empty", name="items")
        return image, meta

    pipe = read()
    pipe.build()
    images, metas = pipe.run()
    found = {}
    for k in range(len(metas)):
        meta = json.loads(bytes(np.array(metas.at(k))).decode())
        found[meta["original_id"]] = np.array(images.at(k)).size
    assert len(found) == 8
    assert {key for key, size in found.items() if size > 0} == {"i0", "i2", "i4", "i6"}


def test_tar_members_have_fixed_metadata(toy_source, tmp_path):
    manifest = _prepare(toy_source, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / manifest["shards"]["items"][0]["file"]) as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {0}
    assert [m.name for m in members][:3] == ["0000000001.jpg", "0000000001.json", "0000000001.txt"]
