"""The raw Amazon and MovieLens layouts, and the `cammsr prepare` command line."""
import gzip
import json
import subprocess
import sys

from conftest import jpeg_bytes
from data_shards.prepare import PrepareOptions, prepare
from data_shards.reader import PreparedDataset
from data_shards.sources.amazon import read_amazon
from data_shards.sources.movielens import read_movielens


def _amazon_folder(tmp_path):
    folder = tmp_path / "amazon"
    folder.mkdir()
    reviews = []
    for user in range(5):
        for step in range(5):
            reviews.append(json.dumps({"reviewerID": f"R{user}", "asin": f"B00{(user + step) % 6}",
                                       "unixReviewTime": 1_400_000_000 + 86400 * step, "overall": 5.0}))
    reviews.append(json.dumps({"reviewerID": "R0", "asin": "B000", "unixReviewTime": 1_500_000_000}))  # repeat
    with gzip.open(folder / "reviews_Beauty_5.json.gz", "wt") as handle:
        handle.write("\n".join(reviews) + "\n")
    meta = [str({"asin": f"B00{k}", "title": f"Lipstick {k}", "brand": "Glam" if k % 2 else "",
                 "categories": [["Beauty", "Makeup", "Lips"]], "imUrl": "http://example.invalid/x.jpg"})
            for k in range(5)]
    meta.append(json.dumps({"asin": "B005", "title": "Shampoo", "brand": "Wash",
                            "category": ["Beauty", "Hair Care"], "image": []}))
    (folder / "meta_Beauty.json").write_text("\n".join(meta) + "\n")
    images = tmp_path / "amazon_images"
    images.mkdir()
    (images / "B001.jpg").write_bytes(jpeg_bytes())
    return folder, images


def test_amazon_reviews_and_metadata(tmp_path):
    folder, images = _amazon_folder(tmp_path)
    manifest = prepare(read_amazon(folder, images=images), tmp_path / "out", PrepareOptions(k_core=3))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (5, 6, 25)
    assert manifest["problems"]["duplicate_interaction_removed_pair"]["count"] == 1
    assert manifest["num_items_with_image"] == 1
    records = {item.original_id: item for item in PreparedDataset(tmp_path / "out").items()}
    assert records["B001"].text == "Lipstick 1. Makeup > Lips. Glam"  # shared root "Beauty" dropped
    assert records["B005"].categories == ["Hair Care"]
    assert records["B001"].image is not None


def test_movielens_100k_and_1m_layouts(tmp_path):
    ml100k = tmp_path / "ml-100k"
    ml100k.mkdir()
    ratings = [f"{u}\t{(u + s) % 4 + 1}\t4\t{880000000 + s}" for u in range(1, 5) for s in range(4)]
    (ml100k / "u.data").write_text("\n".join(ratings) + "\n")
    flags = ["0"] * 19
    rows = []
    for k in range(1, 5):
        genre = list(flags)
        genre[5] = "1"  # Comedy
        rows.append("|".join([str(k), f"Caf\xe9 Movie {k} (1995)", "01-Jan-1995", "", "http://x"] + genre))
    (ml100k / "u.item").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    posters = tmp_path / "posters"
    posters.mkdir()
    (posters / "2.jpg").write_bytes(jpeg_bytes())
    manifest = prepare(read_movielens(ml100k, images=posters), tmp_path / "out100k", PrepareOptions(k_core=3))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (4, 4, 16)
    assert manifest["num_items_with_image"] == 1 and manifest["categories"]["names"] == ["Comedy"]
    item = next(iter(PreparedDataset(tmp_path / "out100k").items()))
    assert item.text_fields == {"title": f"Café Movie {item.original_id}", "year": "1995"}
    assert item.text == f"Café Movie {item.original_id}. Comedy. 1995"

    ml1m = tmp_path / "ml-1m"
    ml1m.mkdir()
    (ml1m / "ratings.dat").write_text("\n".join(r.replace("\t", "::") for r in ratings) + "\n")
    (ml1m / "movies.dat").write_text("\n".join(f"{k}::Film {k} (2000)::Action|Drama" for k in range(1, 5)) + "\n")
    manifest = prepare(read_movielens(ml1m), tmp_path / "out1m", PrepareOptions(k_core=3))
    assert manifest["num_interactions"] == 16 and manifest["categories"]["names"] == ["Action", "Drama"]


def test_command_line_prepare_and_errors(tmp_path):
    folder, images = _amazon_folder(tmp_path)
    cammsr = [sys.executable, "-m", "launch.cli"]
    done = subprocess.run(cammsr + ["prepare", "--source", "amazon", "--input", str(folder), "--images",
                                    str(images), "--out", str(tmp_path / "out"), "--k-core", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "5 users, 6 items, 25 interactions" in done.stdout
    assert "duplicate_interaction_removed_pair: 1" in done.stdout
    missing = subprocess.run(cammsr + ["prepare", "--source", "recbole", "--input", str(tmp_path / "nowhere"),
                                       "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nowhere is not a directory" in missing.stderr
    helptext = subprocess.run(cammsr + ["prepare", "--help"], capture_output=True, text=True).stdout
    for option in ("--source", "--input", "--images", "--text-fields", "--category-field", "--category-sep",
                   "--k-core", "--dedupe", "--num-items", "--num-users", "--seed", "--overwrite"):
        assert option in helptext


def test_command_line_synthetic_dataset_is_multimodal_and_reproducible(tmp_path):
    cammsr = [sys.executable, "-m", "launch.cli", "prepare", "--source", "synthetic", "--num-items", "300",
              "--num-users", "400", "--seed", "3", "--missing-image-rate", "0.1"]
    for name in ("a", "b"):
        done = subprocess.run(cammsr + ["--out", str(tmp_path / name)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    first, second = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("a", "b"))
    assert first["shards"] == second["shards"]
    assert first["source"]["seed"] == 3 and first["num_users"] == 400
    assert 0.8 * first["num_items"] < first["num_items_with_image"] < first["num_items"]
    assert first["categories"]["num_levels"] == 3
    item = next(iter(PreparedDataset(tmp_path / "a").items()))
    assert item.text and item.labels and len(item.categories[0].split("|")) == 3
