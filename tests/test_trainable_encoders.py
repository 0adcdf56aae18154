"""Trainable encoders (features.tune): top layers, LoRA (peft) and an IISAN-style side adapter train with the
recommender inside the DeepSpeed engine. Real transformers encoders (tiny configs, random weights), real ZeRO 2 and 3
over 2 gloo processes, a real SIGKILL."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import PY, ROOT, TINY_SAMPLED, cpu_env, encoder_overrides, kill_after_first_checkpoint
from data_shards.features.encoders import load_image_encoder, load_text_encoder
from train.config import ConfigError, load_config
from train.encoder_tuning import make_trainable
from train.parity import compare

TINY = [*TINY_SAMPLED, "features.mode=stream", "features.lr=0.01"]


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("mode", ["top_layers", "lora"])
def test_gradients_reach_exactly_the_parameters_the_mode_trains(tiny_encoders, mode):
    torch.manual_seed(0)
    text = load_text_encoder(str(tiny_encoders[0]))
    image = load_image_encoder(str(tiny_encoders[1]))
    for encoder, inputs in ((text, text.tokenize(["a red lipstick", "blue nail polish, long lasting"]).batches[0][1]),
                            (image, torch.randn(2, 3, 32, 32))):
        names = make_trainable(encoder.model, mode, tune_layers=1, lora_rank=2, lora_alpha=4)
        encoder.set_trainable(True)
        encoder.train()
        pooled = encoder.pool(inputs)
        (pooled * torch.randn_like(pooled)).sum().backward()  # not a norm: a layernorm's output has a fixed one
        got = {n for n, p in encoder.model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6}
        assert all(p.grad is None for n, p in encoder.model.named_parameters() if n not in names)
        assert all(encoder.model.get_parameter(n).grad is not None for n in names)
        if mode == "lora":
            assert names and all("lora_A" in n or "lora_B" in n for n in names)
            assert got == {n for n in names if "lora_B" in n}  # B starts at zero, so A's first gradient is zero
        else:
            last = len(encoder.model.encoder.layer) - 1
            assert all(n.startswith(f"encoder.layer.{last}.") or n.startswith("layernorm.") for n in names)
            # the key projection's bias has a zero gradient up to rounding (softmax is shift invariant)
            assert set(names) - got <= {n for n in names if n.endswith(("key.bias", "k_proj.bias"))}


def test_side_adapter_starts_near_the_last_layer_and_trains_its_own_parameters():
    from cammsr.side_adapter import SideAdapter
    side = SideAdapter(num_layers=3, dim=8, bottleneck=4)
    states = torch.randn(5, 4, 8)
    out = side(states)
    assert out.shape == (5, 8)
    gate = torch.sigmoid(torch.tensor(-4.0))
    expected = states[:, 0]
    for layer in range(1, 4):
        expected = gate * expected + (1 - gate) * states[:, layer]
    torch.testing.assert_close(out, expected)  # the up-projections start at zero
    assert (out - states[:, 3]).abs().max() < 0.05 * states.abs().max()  # mostly the last layer's state
    out.square().sum().backward()
    assert all(p.grad is not None for p in side.parameters())


@pytest.mark.parametrize("mode, features", [("top_layers", "stream"), ("lora", "stream"),
                                             ("side_adapter", "stream"), ("side_adapter", "cached")])
def test_two_processes_equal_one_at_zero_2_and_3(media_dataset, tiny_encoders, tmp_path, mode, features):
    """Encoders in the engine: 2 processes == 1 process within 1e-5 (losses, ID table, every dense parameter of the
    recommender and the tiny_encoders) at ZeRO 2 and 3; the trained parameters moved, the frozen ones did not. The side
    adapter also in cached mode, where the other modality comes from its feature store."""
    tune = [f"features.tune={mode}"] if features == "stream" else ["features.mode=cached",
                                                                   "features.tune_text=side_adapter"]
    args = ["--steps", "3", "--stages", "2,3", *TINY, *encoder_overrides(tiny_encoders), *tune]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([PY, "-m", "train.parity", "--data", str(media_dataset), "--out", str(one), *args])
    _run([str(ROOT / "launch" / "single_node.sh"), "--nproc", "2", "--python", PY, "--module", "train.parity", "--",
          "--data", str(media_dataset), "--out", str(two), *args])
    one, two = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert two[2]["world_size"] == 2
    assert compare(one, two, 1e-5) == []
    dense = one[3]["dense"]
    original = {**{f"encoders.text.model.{n}": p.reshape(-1) for n, p in
                   load_text_encoder(str(tiny_encoders[0])).model.named_parameters()},
                **{f"encoders.image.model.{n}": p.reshape(-1) for n, p in
                   load_image_encoder(str(tiny_encoders[1])).model.named_parameters()}}
    trained = [n for n in dense if n.startswith("encoders.")]
    assert trained, sorted(dense)[:10]
    moved = [n for n in trained if n not in original or not torch.allclose(dense[n], original[n])]
    if mode == "side_adapter":
        assert all(n.startswith(("encoders.text_side.", "encoders.image_side.")) for n in trained) and moved
    else:
        frozen = [n for n in trained if n in original and "layer.0." not in n and "layernorm" not in n]
        assert frozen and not set(frozen) & set(moved)  # frozen parts of the backbone stayed
        assert moved


def test_activation_checkpointing_recomputes_the_same_gradients(media_dataset, tiny_encoders, tmp_path):
    """features.activation_checkpointing recomputes the trained encoders' blocks in backward: the same 3 steps, the
    same losses and weights (1e-6)."""
    args = ["--steps", "3", "--stages", "2", *TINY, *encoder_overrides(tiny_encoders), "features.tune=top_layers"]
    dumps = []
    for checkpointing in ("false", "true"):
        out = tmp_path / f"checkpointing_{checkpointing}.pt"
        _run([PY, "-m", "train.parity", "--data", str(media_dataset), "--out", str(out), *args,
              f"features.activation_checkpointing={checkpointing}"])
        dumps.append(torch.load(out, weights_only=False))
    assert compare(dumps[0], dumps[1], 1e-6) == []


def _train_cmd(media_dataset, tiny_encoders, run_dir, *extra, resume=False):
    return [PY, "-m", "train.command", "--data", str(media_dataset), "--run-dir", str(run_dir),
            *(["--resume"] if resume else []), *TINY, *encoder_overrides(tiny_encoders), "train.max_epochs=3", *extra]


def test_lora_checkpoint_holds_the_adapters_resumes_and_recommends(media_dataset, tiny_encoders, tmp_path):
    media_dataset = shutil.copytree(media_dataset, tmp_path / "data", ignore=shutil.ignore_patterns("features"))
    full = tmp_path / "full"
    _run(_train_cmd(media_dataset, tiny_encoders, full, "features.tune=lora"))
    metrics = json.loads((full / "metrics.json").read_text())
    latest = json.loads((full / "checkpoints" / "latest").read_text())["tag"]
    from train.recommend import dense_state
    saved = dense_state(full / "checkpoints" / latest / "engine" / "state")
    encoder_keys = [k for k in saved if k.startswith("encoders.")]
    assert encoder_keys and all("lora_" in k for k in encoder_keys)  # adapters only, not the backbone
    assert any(k.startswith("recommender.") for k in saved)

    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_train_cmd(media_dataset, tiny_encoders, killed, "features.tune=lora",
                                           "checkpoint.every_steps=3"), killed)
    _run(_train_cmd(media_dataset, tiny_encoders, killed, "features.tune=lora", "checkpoint.every_steps=3",
                    resume=True))
    after = json.loads((killed / "metrics.json").read_text())
    assert after["valid"] == metrics["valid"] and after["test"] == metrics["test"]

    # recommend re-encodes the catalogue with the trained adapters: the run's metrics, and text vectors that are not
    # the frozen encoder's
    from train.recommend import RunRecommender
    rec = RunRecommender(full)
    assert rec.evaluate("test") == metrics["test"]
    frozen = load_text_encoder(str(tiny_encoders[0])).encode([next(rec.data.items()).text])
    assert not torch.allclose(rec.items.text[1], frozen[0], atol=1e-4)


@pytest.mark.parametrize("override, message", [
    (["features.mode=cached", "features.tune=lora"], "features.mode=stream"),
    (["features.tune=everything"], "features.tune"),
    (["features.tune_image=top_layers", "features.tune_layers=0"], "features.tune_layers"),
])
def test_bad_tuning_settings_stop_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.loss_type=sampled_softmax", "features.mode=stream", *override])
