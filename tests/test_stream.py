"""Stream mode (features.mode=stream): images and texts read from the shards by id, decoded by DALI and encoded inside
the training step. Real components throughout: the DALI pipeline, real transformers encoders (tiny configs, random
weights), the Trainer with TorchRec and DeepSpeed, 2 real processes on gloo, a real SIGKILL."""
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, TINY_SAMPLED, cpu_env, encoder_overrides, kill_after_first_checkpoint
from data_shards.checksum import sha256_file
from data_shards.problems import DataError
from data_shards.reader import PreparedDataset
from train.config import ConfigError, load_config
from train.parity import compare

# The trainer tests' tiny CAMMSR (fp32, no dropout, deterministic swap) with the sampled softmax stream mode needs.
TINY = [*TINY_SAMPLED]


def _run(cmd, timeout=300, expect=0):
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _parity(media_dataset, tiny_encoders, out, *extra, nproc=1, stages="1"):
    args = ["--data", str(media_dataset), "--out", str(out), "--steps", "3", "--stages", stages, *TINY,
            *encoder_overrides(tiny_encoders), *extra]
    if nproc == 1:
        _run([PY, "-m", "train.parity", *args])
    else:
        _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY, "--module",
              "train.parity", "--", *args])
    return torch.load(out, weights_only=False)


def _stream(media_dataset, tiny_encoders, device="cpu"):
    from train.config import DataConfig, FeaturesConfig
    from train.media import MediaStream
    data = PreparedDataset(media_dataset)
    data_cfg = DataConfig(text_encoder=str(tiny_encoders[0]), image_encoder=str(tiny_encoders[1]))
    return data, MediaStream(data, ("id", "text", "image"), data_cfg, FeaturesConfig(mode="stream"),
                             torch.device(device), 0, 1)


def _no_categories():
    from train.items import ItemInputs
    return ItemInputs(None, None, None, None, [])


def test_stream_features_equal_the_cached_store(media_dataset, tiny_encoders):
    """The same frozen encoders give the same item vectors through both paths: cached = the `extract` stage's DALI
    walk of the shards into the fp16 store; stream = items read by id, DALI fed by external_source, encoded here."""
    from data_shards.features.extract import ExtractOptions, extract_features
    stores = extract_features(media_dataset, ExtractOptions(text_encoder=str(tiny_encoders[0]),
                                                            image_encoder=str(tiny_encoders[1]), force=True))
    data, stream = _stream(media_dataset, tiny_encoders)
    catalogue = stream.catalogue(_no_categories(), progress=False)
    for modality, table in (("text", catalogue.text), ("image", catalogue.image)):
        store = stores[modality]
        assert table.shape == store.features.shape
        assert torch.equal(table.abs().sum(1) > 0, torch.from_numpy(store.mask)), modality  # same items masked
        torch.testing.assert_close(table, torch.from_numpy(np.asarray(store.features, dtype=np.float32)),
                                   rtol=2e-3, atol=2e-3)
    assert int((catalogue.image.abs().sum(1) == 0).sum()) - 1 == data.num_items - data.manifest["num_items_with_image"]
    assert stream.problems()["image_missing"]["count"] == data.num_items - data.manifest["num_items_with_image"]
    stream.close()


def test_token_and_patch_states_have_masks_for_padding_and_missing_images(media_dataset, tiny_encoders):
    data, stream = _stream(media_dataset, tiny_encoders)
    without_image = [item.item_id for item in data.items() if item.image is None]
    ids = np.array([0, 1, 2, without_image[0], 7])
    batch = stream.prepare(ids)
    states = stream.token_states(batch)
    text, text_mask = states["text"]
    image, image_mask = states["image"]
    assert text.shape[:2] == text_mask.shape and text.shape[0] == 5 and text.shape[2] == 16
    assert image.shape == (5, 1 + (32 // 8) ** 2, 16) and image_mask.shape == image.shape[:2]
    row = {int(i): n for n, i in enumerate(batch.ids)}
    assert not text_mask[row[0]].any() and not image_mask[row[0]].any()  # padding id 0: nothing
    assert not image_mask[row[without_image[0]]].any() and text_mask[row[without_image[0]]].any()
    assert image_mask[row[1]].all() and image[row[1]].abs().sum() > 0
    lengths = text_mask.sum(1)
    assert lengths[row[1]] > 0 and (lengths < text_mask.shape[1]).any()  # padding tokens are masked out
    assert (text[~text_mask] == 0).all()
    # pooled vectors are the [CLS] position of the token states (the tiny BERT pools "cls")
    pooled = stream.encode(batch, _no_categories())
    torch.testing.assert_close(pooled.text[row[2]], text[row[2], 0], rtol=1e-5, atol=1e-5)
    stream.close()


def test_stream_training_matches_cached(media_dataset, tiny_encoders, tmp_path):
    """Same encoders, frozen: stream and cached give the same losses for 3 steps and the same validation and test
    metrics before training, within 1e-3 (the store keeps fp16 vectors, stream fp32)."""
    cached = _parity(media_dataset, tiny_encoders, tmp_path / "cached.pt", "data.build_features=true")
    stream = _parity(media_dataset, tiny_encoders, tmp_path / "stream.pt", "features.mode=stream")
    for stage in cached:
        a, b = cached[stage], stream[stage]
        assert len(a["losses"]) == len(b["losses"]) == 3
        assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-3, (a["losses"], b["losses"])
        for split in ("valid", "test"):
            for key, value in a["metrics_before"][split].items():
                assert abs(value - b["metrics_before"][split][key]) <= 1e-3, (split, key)


def test_stream_two_processes_equal_one(media_dataset, tiny_encoders, tmp_path):
    """Stream mode keeps the global-batch equivalence: 81 users on 2 ranks, each rank encoding its own items and its
    half of the catalogue, give the losses, ID table and dense weights of one process (1e-5), metrics exactly."""
    one = _parity(media_dataset, tiny_encoders, tmp_path / "one.pt", "features.mode=stream", stages="2")
    two = _parity(media_dataset, tiny_encoders, tmp_path / "two.pt", "features.mode=stream", nproc=2, stages="2")
    assert two[2]["world_size"] == 2
    assert compare(one, two, 1e-5) == []


def _train_cmd(media_dataset, tiny_encoders, run_dir, *extra, resume=False):
    return [PY, "-m", "train.command", "--data", str(media_dataset), "--run-dir", str(run_dir),
            *(["--resume"] if resume else []), *TINY, *encoder_overrides(tiny_encoders), "features.mode=stream",
            "train.max_epochs=3", "logging.every_steps=2", *extra]


def test_stream_kill_resume_equals_uninterrupted(media_dataset, tiny_encoders, tmp_path):
    """A stream run builds no feature store, shows its media rates, resumes after SIGKILL on the same curve, and
    `cammsr recommend` re-encodes its catalogue from the shards."""
    media_dataset = shutil.copytree(media_dataset, tmp_path / "data", ignore=shutil.ignore_patterns("features"))
    full = tmp_path / "full"
    trained = _run(_train_cmd(media_dataset, tiny_encoders, full))
    assert not (media_dataset / "features").exists()
    assert "content features computed in the run" in trained.stdout and "in the step, frozen" in trained.stdout
    metrics = json.loads((full / "metrics.json").read_text())
    totals = metrics["media"]["rank0_totals"]
    assert totals["images"] > 0 and totals["texts"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(full / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("perf/images_per_s", "perf/texts_per_s", "perf/targets_per_s", "perf/stream/decode_s"):
        assert tag in events.Tags()["scalars"], tag

    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_train_cmd(media_dataset, tiny_encoders, killed, "checkpoint.every_steps=3"),
                                killed)
    resumed = _run(_train_cmd(media_dataset, tiny_encoders, killed, "checkpoint.every_steps=3", resume=True))
    assert "resumed from" in resumed.stdout
    after = json.loads((killed / "metrics.json").read_text())
    assert after["valid"] == metrics["valid"] and after["test"] == metrics["test"]
    assert [r["valid"] for r in after["history"]] == [r["valid"] for r in metrics["history"]]

    # `cammsr recommend` on a stream run encodes the catalogue from the shards (no store exists) and reproduces the
    # run's own metrics
    from train.recommend import RunRecommender
    rec = RunRecommender(full)
    assert rec.evaluate("test") == metrics["test"]


def _rewrite_item_shard(root, edit) -> None:
    """Rewrite the dataset's first item shard with `edit(name, bytes) -> bytes` applied to every member, then its
    DALI index and the manifest's size and checksum: a dataset whose shard holds what a faulty producer wrote."""
    from wds2idx import IndexCreator
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["shards"]["items"][0]
    shard = root / entry["file"]
    with tarfile.open(shard) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as target:
        for member, payload in members:
            payload = edit(member.name, payload)
            member.size = len(payload)
            target.addfile(member, io.BytesIO(payload))
    with IndexCreator(str(shard), str(root / entry["dali_index"]), verbose=False) as creator:
        creator.create_index()
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)
    manifest_path.write_text(json.dumps(manifest))


def test_bad_media_are_masked_counted_and_training_goes_on(media_dataset, tiny_encoders, tmp_path):
    """Bytes with no readable image header (item 3: kept away from DALI, whose parser has crashed the process on
    them), a JPEG cut in half (item 6: a readable header, so DALI meets it and fails), an empty image (item 4): masked
    for the rest of the run, named with their shard in the log and metrics.json; a text over the encoder's 32 tokens
    (item 5): cut there, counted once."""
    bad = tmp_path / "bad"
    shutil.copytree(media_dataset, bad, ignore=shutil.ignore_patterns("features"))
    long_text = " ".join(["lipstick"] * 80).encode()
    _rewrite_item_shard(bad, lambda name, data: {"0000000003.jpg": b"\xff\xd8\xff\xe0 not really a jpeg" * 4,
                                                 "0000000004.jpg": b"", "0000000005.txt": long_text,
                                                 "0000000006.jpg": data[:len(data) // 2]}.get(name, data))
    run = tmp_path / "run"
    proc = _run(_train_cmd(bad, tiny_encoders, run, "train.max_epochs=2"))
    log = proc.stdout + proc.stderr
    assert ("item 3 (items/items-000000.tar): image masked for the rest of the run: unreadable image header "
            "(OSError: Truncated File Read)") in log
    assert ("item 6 (items/items-000000.tar): image masked for the rest of the run: DALI cannot decode it "
            "(Failed to decode sample #0)") in log
    assert "item 4 (items/items-000000.tar): image masked for the rest of the run: empty image" in log
    assert log.count("item 3 (items/items-000000.tar): image masked") == 1  # found once, then skipped
    problems = json.loads((run / "metrics.json").read_text())["media"]["problems"]
    assert problems["bad_image_masked"]["count"] == 3
    assert {example.split(":")[0] for example in problems["bad_image_masked"]["examples"]} == {
        "item 3", "item 4", "item 6"}
    assert problems["text_truncated"] == {"count": 1, "examples": [
        "item 5: items/items-000000.tar: longer than 32 tokens, cut there"]}
    assert json.loads((run / "metrics.json").read_text())["test"]["count"] == 81


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_shard_stops_before_the_first_step(media_dataset, tiny_encoders, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(media_dataset, broken, ignore=shutil.ignore_patterns("features"))
    shard = broken / "items" / "items-000000.tar"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    else:
        shard.unlink()
    proc = subprocess.run(_train_cmd(broken, tiny_encoders, tmp_path / "run"), cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert str(shard) in proc.stderr and "epoch 0" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_the_shard_reader_itself_refuses_a_truncated_shard(media_dataset, tmp_path):
    """What ranks other than 0 rely on (they do not verify checksums): the by-id reader checks sizes and offsets."""
    from data_shards.item_media import ItemMediaReader
    broken = tmp_path / "broken"
    shutil.copytree(media_dataset, broken, ignore=shutil.ignore_patterns("features"))
    shard = broken / "items" / "items-000000.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(DataError, match="items-000000.tar: .* bytes, manifest.json says"):
        ItemMediaReader(PreparedDataset(broken, verify=False))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"]["items"][0]["bytes"] = shard.stat().st_size  # a manifest that agrees: the index does not
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lies outside items/items-000000.tar"):
        ItemMediaReader(PreparedDataset(broken, verify=False))


@pytest.mark.parametrize("override, message", [
    (["model.loss_type=full_softmax"], "would encode the whole catalogue"),
    (["train.negative_sharing=per_target"], "train.negative_sharing=shared"),
])
def test_stream_mode_refuses_losses_that_would_encode_too_much(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["features.mode=stream", "model.loss_type=sampled_softmax", *override])
