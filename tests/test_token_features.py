"""Token-level feature stores (`extract` with tokens) and TAME trained on them by the real trainer: the stored states
are the encoders' own, padding is zero, the patch grid is pooled, 2 processes train TAME as 1, and a finished run
reproduces its metrics when loaded."""
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, cpu_env, encoder_overrides
from data_shards.features.encoders import load_image_encoder, load_text_encoder
from data_shards.features.extract import ExtractOptions, extract_features
from data_shards.features.pil_images import crop_image, normalise
from data_shards.features.preprocess import ImagePreprocessing
from data_shards.reader import PreparedDataset
from train.config import ConfigError, load_config, validate
from train.parity import compare

TINY_TAME = ["model.name=tame", "train.precision=fp32", "train.eps=0.001", "model.hidden_size=8",
             "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1", "model.ffn_inner_size=16",
             "model.hidden_dropout=0.0", "model.attn_dropout=0.0", "model.tame_text_heads=2",
             "model.tame_image_heads=2", "data.image_token_grid=2", "data.text_token_limit=12"]


@pytest.fixture(scope="module")
def token_stores(media_dataset, tiny_encoders):
    options = ExtractOptions(text_encoder=str(tiny_encoders[0]), image_encoder=str(tiny_encoders[1]), tokens=True,
                             text_token_limit=12, image_token_grid=2, image_reader="pil")
    return extract_features(media_dataset, options)


def test_token_stores_hold_the_encoders_states(media_dataset, tiny_encoders, token_stores):
    data = PreparedDataset(media_dataset, verify=False)
    text, image = token_stores["text_tokens"], token_stores["image_tokens"]
    assert text.features.shape[:2] == (data.num_items + 1, 12) and image.features.shape[1] == 1 + 2 * 2
    assert not np.asarray(text.features[0]).any() and not np.asarray(image.features[0]).any()
    items = {item.item_id: item for item in data.items()}
    text_encoder = load_text_encoder(str(tiny_encoders[0]), max_length=12)
    (_, tokens), = text_encoder.tokenize([items[5].text]).batches
    with torch.no_grad():
        states, mask = text_encoder.token_states(tokens)
    length = int(mask.sum())
    stored = torch.from_numpy(np.asarray(text.features[5], dtype=np.float32))
    torch.testing.assert_close(stored[:length], states[0, :length], atol=2e-2, rtol=1e-2)  # fp16 store
    assert not stored[length:].any()  # padding tokens are zero vectors
    image_encoder = load_image_encoder(str(tiny_encoders[1]))
    with_image = next(i for i, item in items.items() if item.image and image.mask[i])
    prep = ImagePreprocessing.for_encoder(image_encoder.image_size, image_encoder.mean, image_encoder.std)
    pixels = normalise(crop_image(items[with_image].image, prep)[None], prep)
    with torch.no_grad():
        patches = image_encoder.patch_states(pixels)[0]  # [CLS] + 4 x 4 patches
    grid = patches[1:].reshape(2, 2, 2, 2, -1).mean(dim=(1, 3)).reshape(4, -1)  # each 2 x 2 block of the 4 x 4
    expected = torch.cat([patches[:1], grid])
    torch.testing.assert_close(torch.from_numpy(np.asarray(image.features[with_image], dtype=np.float32)), expected,
                               atol=3e-2, rtol=1e-2)
    without = next(i for i in items if not image.mask[i])
    assert not np.asarray(image.features[without]).any()


def test_tame_refuses_stream_mode():
    with pytest.raises(ConfigError, match="token-level feature stores"):
        validate(load_config(None, ["model.name=tame", "features.mode=stream", "model.loss_type=sampled_softmax",
                                    "train.num_negatives=8"]), world_size=1, cuda=False)


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("mode, stage", [(["train.batch_size=64"], "3"),
                                         (["train.batch_size=48", "train.batch_unit=targets",
                                           "model.sequence_mode=all_positions"], "1")])
def test_two_processes_train_tame_as_one(media_dataset, tiny_encoders, token_stores, tmp_path, mode, stage):
    """2 processes == 1 within 1e-5 over 3 steps, at ZeRO 3 (every weight partitioned) and at ZeRO 1."""
    dumps = {}
    for nproc in (1, 2):
        out = tmp_path / f"tame{nproc}.pt"
        _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY, "--module",
              "train.parity", "--", "--data", str(media_dataset), "--out", str(out), "--steps", "3", "--stages", stage,
              *TINY_TAME, *encoder_overrides(tiny_encoders), "data.build_features=false", *mode])
        dumps[nproc] = torch.load(out, weights_only=False)
    assert compare(dumps[1], dumps[2], 1e-5) == []


def test_a_tame_run_reproduces_its_metrics_when_loaded(media_dataset, tiny_encoders, token_stores, tmp_path):
    from train.recommend import RunRecommender
    run = tmp_path / "run"
    _run([PY, "-m", "train.command", "--data", str(media_dataset), "--run-dir", str(run), *TINY_TAME,
          *encoder_overrides(tiny_encoders), "train.batch_size=128", "max_epochs=2"])
    metrics = json.loads((run / "metrics.json").read_text())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert "cammsr/expert_usage/id_enrichment/expert0" in events.Tags()["scalars"]
    rec = RunRecommender(run)
    assert rec.items.text.dim() == 3 and rec.items.image.shape[1] == 5
    assert rec.evaluate("test") == metrics["test"]
