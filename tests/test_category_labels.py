"""The category labels a run reads (train.category_labels): one path per item, virtual categories from the item
features, the paper's removal / misleading label noise; and through the real trainer."""
import json
import subprocess

import numpy as np
import pytest

from conftest import PY, ROOT, cpu_env, write_tiny_dataset
from data_shards.reader import PreparedDataset
from train.category_labels import add_noise, category_labels, dataset_labels, first_path, virtual_labels
from train.config import ConfigError, load_config, validate

def test_first_path_is_the_first_category_path_and_its_prefixes():
    index = {"A": 0, "B": 1, "A|x": 2, "A|y": 3, "B|z": 4, "A|x|1": 5}
    assert first_path("A|x|1", index) == [0, 2, 5]
    assert first_path("B|z", index) == [1, 4]
    assert first_path("A|q", index) == [0]  # a level the vocabulary does not hold is left out


def _labels(rows: list[list[int]], size: int = 6) -> np.ndarray:
    table = np.zeros((len(rows) + 1, size), dtype=np.float32)
    for item, row in enumerate(rows, start=1):
        table[item, row] = 1.0
    return table


def test_removal_deletes_the_labels_of_a_seeded_fraction():
    labels = _labels([[0, 2], [1, 4], [0, 3], [], [0, 2, 5], [1, 4], [0, 3], [1], [0], [0, 2]])
    noisy, count = add_noise(labels, 0.3, "removal", seed=7)
    labelled = np.flatnonzero(labels.sum(1) > 0)
    assert count == round(0.3 * len(labelled)) == 3
    emptied = [i for i in labelled if noisy[i].sum() == 0]
    assert len(emptied) == 3 and np.array_equal(np.delete(noisy, emptied, 0), np.delete(labels, emptied, 0))
    again, _ = add_noise(labels, 0.3, "removal", seed=7)
    assert np.array_equal(noisy, again)
    assert not np.array_equal(noisy, add_noise(labels, 0.3, "removal", seed=8)[0])


def test_misleading_gives_each_corrupted_item_another_items_different_labels():
    labels = _labels([[0, 2], [1, 4], [0, 3], [], [0, 2, 5], [1, 4], [0, 3], [1], [0], [0, 2]])
    noisy, count = add_noise(labels, 0.5, "misleading", seed=3)
    changed = np.flatnonzero((noisy != labels).any(axis=1))
    assert count == len(changed) == round(0.5 * 9)
    label_sets = {tuple(row) for row in labels[1:] if row.sum() > 0}
    assert all(tuple(noisy[i]) in label_sets and not np.array_equal(noisy[i], labels[i]) for i in changed)
    assert noisy[4].sum() == 0  # unlabelled items stay unlabelled


def test_virtual_categories_cluster_the_items_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    text = np.zeros((31, 8), dtype=np.float32)
    text[1:] = centres[np.arange(30) % 3] + rng.normal(size=(30, 8))
    text[7] = 0.0  # an item without text
    labels = virtual_labels([text], count=3, seed=0)
    assert labels[0].sum() == 0 and labels[7].sum() == 0
    assert (labels[1:].sum(1) == np.where(np.arange(1, 31) == 7, 0, 1)).all()
    cluster = labels.argmax(1)
    for k in range(3):  # items of one centre share one virtual category
        members = [i for i in range(1, 31) if i != 7 and (i - 1) % 3 == k]
        assert len({cluster[i] for i in members}) == 1
    assert np.array_equal(labels, virtual_labels([text], count=3, seed=0))


def test_the_dataset_labels_and_the_virtual_source_on_a_prepared_dataset(tmp_path):
    data = PreparedDataset(write_tiny_dataset(tmp_path / "tiny"))
    every = dataset_labels(data, first_path_only=False)
    assert every.shape == (data.num_items + 1, len(data.categories["names"])) and every[0].sum() == 0
    one = dataset_labels(data, first_path_only=True)
    assert (one <= every).all() and (one[1:].sum(1) <= data.categories["num_levels"]).all()
    with pytest.raises(Exception, match="cached feature store"):
        category_labels(data, "virtual", 4, 0.0, "removal", 0, [])


def test_config_refuses_bad_category_settings():
    with pytest.raises(ConfigError, match="categories.noise"):
        validate(load_config(None, ["categories.noise=1.2"]), world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="categories.noise_type"):
        validate(load_config(None, ["categories.noise_type=shuffled"]), world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="categories.source"):
        validate(load_config(None, ["categories.source=llm"]), world_size=1, cuda=False)


TRAIN = ["model.hidden_size=8", "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1",
         "model.num_experts=2", "model.ffn_inner_size=16", "train.batch_size=128", "max_epochs=1",
         "logging.tensorboard=false", "data.build_features=false", "train.precision=fp32"]


@pytest.mark.parametrize("settings, expected", [
    (["categories.noise=0.3", "categories.noise_type=misleading"], {"source": "dataset", "noise_type": "misleading"}),
    (["categories.source=virtual", "categories.virtual_count=5"], {"source": "virtual", "vocabulary": 5}),
])
def test_the_trainer_reads_the_chosen_labels_and_reports_them(tmp_path, settings, expected):
    data = write_tiny_dataset(tmp_path / "tiny")
    run = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "train.command", "--data", str(data), "--run-dir", str(run), *TRAIN, *settings],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    summary = json.loads((run / "metrics.json").read_text())["categories"]
    assert expected.items() <= summary.items()
    if "noise" in summary:
        assert summary["corrupted_items"] == round(0.3 * summary["labelled_items"])
    assert "categories: source" in proc.stdout + proc.stderr
