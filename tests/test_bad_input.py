"""Each kind of bad input has a defined behaviour: skipped and counted, or stopped with a named error."""
import json

import pytest

from conftest import jpeg_bytes, toy_interactions, toy_items, write_recbole
from data_shards.prepare import PrepareOptions, prepare
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from data_shards.sources.recbole import read_recbole


def _prepare(folder, out, k_core=3, **options):
    return prepare(read_recbole(folder), out, PrepareOptions(k_core=k_core, **options))


def _problem(manifest, kind):
    return manifest["problems"].get(kind, {"count": 0, "examples": []})


def test_missing_and_undecodable_images_are_counted_and_items_kept(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items())
    images = folder / "images"
    images.mkdir()
    good = jpeg_bytes()
    (images / "i0.jpg").write_bytes(good)
    (images / "i1.jpg").write_bytes(b"this is not a jpeg")
    (images / "i2.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (images / "i3.png").write_bytes(b"")
    manifest = _prepare(folder, tmp_path / "out")
    assert manifest["num_items"] == 8 and manifest["num_items_with_image"] == 1
    unusable = _problem(manifest, "unusable_image_item_kept_without_image")
    assert unusable["count"] == 3
    assert any("i1.jpg" in example for example in unusable["examples"])
    assert _problem(manifest, "item_without_image_kept")["count"] == 4
    items = {item.original_id: item for item in PreparedDataset(tmp_path / "out").items()}
    assert items["i0"].image == good and items["i1"].image is None and items["i2"].image is None


def test_empty_text_and_unknown_category_are_counted(tmp_path):
    items = toy_items()
    items[3] = ("i3", "", "", "")
    items[5] = ("i5", "Blue widget", "", "Unknown")
    folder = write_recbole(tmp_path / "src", toy_interactions(), items)
    manifest = _prepare(folder, tmp_path / "out", text_with_categories=True)
    assert _problem(manifest, "item_with_empty_text_kept")["count"] == 1
    no_category = _problem(manifest, "item_without_category_kept")
    assert no_category["count"] == 2 and any("i5" in e for e in no_category["examples"])
    records = {item.original_id: item for item in PreparedDataset(tmp_path / "out").items()}
    assert records["i3"].text == "" and records["i5"].labels == [] and records["i5"].text == "Blue widget"


def test_rare_categories_are_dropped_from_the_vocabulary_and_counted(tmp_path):
    items = toy_items()
    items[0] = ("i0", "Odd widget", "B", "Tools|Widgets|Unique")
    folder = write_recbole(tmp_path / "src", toy_interactions(), items)
    manifest = _prepare(folder, tmp_path / "out", min_category_count=2)
    assert "Tools|Widgets|Unique" not in manifest["categories"]["names"]
    assert _problem(manifest, "rare_category_dropped")["count"] == 1


def test_non_utf8_text_is_replaced_and_counted(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items())
    item_file = folder / "toy.item"
    item_file.write_bytes(item_file.read_bytes().replace(b"Red widget 4", b"Caf\xe9 widget 4"))
    manifest = _prepare(folder, tmp_path / "out")
    problem = _problem(manifest, "text_not_utf8_replaced")
    assert problem["count"] == 1 and "toy.item:6" in problem["examples"][0]
    records = {item.original_id: item for item in PreparedDataset(tmp_path / "out").items()}
    assert records["i4"].text.startswith("Caf\ufffd widget 4")


def test_short_users_are_removed_and_counted(tmp_path):
    rows = toy_interactions() + [("lonely", "i1", 5000)] + [("pair", "i1", 1), ("pair", "i2", 2)]
    folder = write_recbole(tmp_path / "src", rows, toy_items())
    manifest = _prepare(folder, tmp_path / "out", k_core=1)
    assert manifest["num_users"] == 6
    removed = [kind for kind in manifest["problems"] if kind.startswith("interaction_removed_by_filter")]
    assert manifest["problems"][removed[0]]["count"] == 3


def test_a_few_malformed_lines_are_skipped_with_file_and_line(tmp_path):
    rows = toy_interactions(num_users=40, num_items=8)
    folder = write_recbole(tmp_path / "src", rows, toy_items())
    inter = folder / "toy.inter"
    lines = inter.read_text().splitlines()
    lines.insert(10, "u1\ti2\tnot-a-time")
    inter.write_text("\n".join(lines) + "\n")
    manifest = _prepare(folder, tmp_path / "out")
    problem = _problem(manifest, "malformed_interaction_line")
    assert problem["count"] == 1 and "toy.inter:11" in problem["examples"][0]
    assert manifest["num_interactions"] == len(rows)


def test_many_malformed_lines_stop_naming_the_file(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions())
    inter = folder / "toy.inter"
    inter.write_text(inter.read_text() + "garbage line\nmore garbage\n")
    with pytest.raises(DataError, match=r"toy\.inter: 2 of 38 lines are malformed"):
        read_recbole(folder)


def test_missing_column_stops_naming_it(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "x.inter").write_text("user_id:token\titem:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(DataError, match="no column named item_id"):
        read_recbole(folder)


def test_item_missing_from_item_file_is_kept_and_counted(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items()[:-1])
    manifest = _prepare(folder, tmp_path / "out")
    assert manifest["num_items"] == 8
    assert _problem(manifest, "item_without_metadata_kept")["count"] == 1


@pytest.fixture
def prepared(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items())
    manifest = _prepare(folder, tmp_path / "out")
    return tmp_path / "out", manifest


def test_truncated_shard_is_refused_naming_it(prepared):
    root, manifest = prepared
    shard = root / manifest["shards"]["items"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataError, match=r"items-000000\.tar: 700 bytes.*truncated"):
        PreparedDataset(root)
    with pytest.raises(DataError, match=r"items-000000\.tar: unreadable shard"):
        list(PreparedDataset(root, verify=False).items())


def test_checksum_mismatch_is_refused_naming_the_shard(prepared):
    root, manifest = prepared
    shard = root / manifest["shards"]["users"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"users-000000\.tar: sha256 .* does not match"):
        PreparedDataset(root)


def test_output_folder_with_a_different_dataset_is_refused(prepared, tmp_path):
    root, manifest = prepared
    other = write_recbole(tmp_path / "other", toy_interactions(num_users=7), toy_items())
    with pytest.raises(DataError, match="already holds a different dataset"):
        _prepare(other, root)
    assert json.loads((root / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    replaced = _prepare(other, root, overwrite=True)
    assert replaced["num_users"] == 7 and PreparedDataset(root).num_users == 7


def test_output_folder_with_foreign_files_is_refused(tmp_path):
    folder = write_recbole(tmp_path / "src", toy_interactions(), toy_items())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no manifest.json"):
        _prepare(folder, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
