"""The expected counts of the real datasets in ../shared/data (skipped where it is absent)."""
import json

from conftest import shared_dataset
from data_shards.prepare import PrepareOptions, prepare
from data_shards.reader import PreparedDataset
from data_shards.sources.recbole import read_recbole


def test_beauty_counts_match_the_paper(tmp_path):
    raw = read_recbole(shared_dataset("amazon_beauty"))
    manifest = prepare(raw, tmp_path / "beauty", PrepareOptions(k_core=5))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (22363, 12101, 198502)
    assert manifest["num_items_with_image"] == 0
    # RecBole's prefix count for this file (STACK.md): interactions - 3 x users
    assert manifest["statistics"]["training_prefixes"] == 131413
    assert manifest["categories"]["num_levels"] >= 3
    data = PreparedDataset(tmp_path / "beauty")
    first = next(iter(data.items()))
    assert first.text.startswith("OPI Nail Lacquer") and "Makeup > Nails > Nail Polish" in first.text
    assert first.text.endswith("OPI")  # title + categories + brand
    names = data.categories["names"]
    assert {names[label] for label in first.labels} == {"Makeup", "Makeup|Nails", "Makeup|Nails|Nail Polish"}


def test_beauty_sequences_reproduce_beauty_txt(tmp_path):
    folder = shared_dataset("amazon_beauty")
    prepare(read_recbole(folder), tmp_path / "beauty", PrepareOptions(k_core=5))
    data = PreparedDataset(tmp_path / "beauty")
    expected = {}
    for line in (folder / "Beauty.txt").read_text().splitlines():
        user, *items = line.split()
        expected[user] = items
    item_original = {record.item_id: record.original_id for record in data.items()}
    for sequence in data.user_sequences():
        assert [item_original[i] for i in sequence.items] == expected[sequence.original_id]


def test_ml100k_counts_and_images(tmp_path):
    folder = shared_dataset("ml100k_posters")
    manifest = prepare(read_recbole(folder, images=folder / "posters"), tmp_path / "ml100k",
                       PrepareOptions(k_core=1))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (943, 1682, 100000)
    assert manifest["num_items_with_image"] == 1650
    assert manifest["problems"]["item_without_image_kept"]["count"] == 32
    genres = manifest["categories"]["names"]
    assert "Comedy" in genres and "Children's" in genres and manifest["categories"]["num_levels"] == 1
    on_disk = json.loads((tmp_path / "ml100k" / "manifest.json").read_text())
    assert on_disk["num_items_with_image"] == 1650


def test_ml100k_five_core_is_a_fixed_point(tmp_path):
    folder = shared_dataset("ml100k_posters")
    prepare(read_recbole(folder), tmp_path / "core", PrepareOptions(k_core=5))
    data = PreparedDataset(tmp_path / "core")
    sequences = list(data.user_sequences())
    counts = {}
    for sequence in sequences:
        assert len(sequence.items) >= 5
        for item in sequence.items:
            counts[item] = counts.get(item, 0) + 1
    assert min(counts.values()) >= 5 and len(counts) == data.num_items < 1682
