"""The recipe options a tuning study draws from, each doing what its key says: LR warm-up and decay, weight decay
through the real DeepSpeed engine, every dropout, sequences of 200 items, embedding size / blocks / heads."""
import json
import math

import pytest
import torch

from cammsr.config import ModelConfig
from cammsr.factory import build_model
from conftest import PY
from test_train_distributed import _run
from train.config import TrainConfig
from train.engine import lr_lambda


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_then_decay_to_the_floor(schedule):
    train = TrainConfig(lr=1e-3, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    factor = lr_lambda(train, total_steps=110)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    halfway, end = factor(60), factor(110)
    expected = {"constant": (1.0, 1.0), "linear": (0.55, 0.1), "cosine": (0.1 + 0.9 * 0.5, 0.1)}[schedule]
    assert (halfway, end) == pytest.approx(expected)
    assert all(factor(s) >= factor(s + 1) - 1e-12 for s in range(10, 110))  # never rises after warm-up


_ENGINE = """
import json, sys, torch
from train.config import TrainConfig
from train.distributed import init_distributed, shutdown
from train.engine import build_engine
init_distributed()
out = {}
for optimizer in ("adam", "adamw"):
    for decay in (0.0, 0.1):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        before = model.weight.detach().abs().sum().item()
        train = TrainConfig(lr=0.01, optimizer=optimizer, weight_decay=decay, precision="fp32", schedule="cosine",
                            warmup_steps=2)
        engine, scheduler = build_engine(model, train, 1, total_steps=10)
        lrs = []
        for _ in range(3):
            engine.backward((model(torch.zeros(2, 4)) * 0).sum())  # a zero loss: only the decay moves weights
            engine.step()
            lrs.append(scheduler.get_last_lr()[0])
        out[f"{optimizer}/{decay}"] = {"change": model.weight.detach().abs().sum().item() / before, "lrs": lrs}
        engine.destroy()
print("RESULT", json.dumps(out))
shutdown()
"""


def test_weight_decay_and_schedule_act_through_the_deepspeed_engine(tmp_path):
    proc = _run([PY, "-c", _ENGINE])
    got = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    for optimizer in ("adam", "adamw"):
        assert got[f"{optimizer}/0.0"]["change"] == pytest.approx(1.0, abs=1e-7)  # no gradient, no decay: still
        assert got[f"{optimizer}/0.1"]["change"] < 0.999  # weights shrink toward zero
        # after steps 1-3 of 2 warm-up steps then cosine over 8: full lr twice, then the first decayed value
        assert got[f"{optimizer}/0.1"]["lrs"] == pytest.approx([0.01, 0.01, 0.01 * (0.5 + 0.5 * math.cos(math.pi / 8))])


def _sasrec(**changes):
    settings = dict(name="sasrec", hidden_size=16, max_seq_len=12, num_layers=1, num_heads=2, ffn_inner_size=32,
                    hidden_dropout=0.0, attn_dropout=0.0)
    cfg = ModelConfig(**{**settings, **changes})
    return build_model(cfg, 0, 0, 0), cfg


def _forward_twice(model, cfg, length=8):
    torch.manual_seed(1)
    seq = torch.randint(1, 30, (3, length))
    emb = torch.randn(3, length, cfg.hidden_size)
    model.train()
    torch.manual_seed(2)
    first = model(seq, torch.full((3,), length), emb).user_vectors
    torch.manual_seed(3)
    second = model(seq, torch.full((3,), length), emb).user_vectors
    return first, second


@pytest.mark.parametrize("key", ["hidden_dropout", "attn_dropout"])
def test_each_dropout_acts_alone_in_training_and_never_in_eval(key):
    model, cfg = _sasrec()
    assert torch.equal(*_forward_twice(model, cfg))  # both off: training is deterministic
    model, cfg = _sasrec(**{key: 0.3})
    first, second = _forward_twice(model, cfg)
    assert not torch.allclose(first, second)
    model.eval()
    seq, emb = torch.randint(1, 30, (3, 8)), torch.randn(3, 8, cfg.hidden_size)
    assert torch.equal(model(seq, torch.full((3,), 8), emb).user_vectors,
                       model(seq, torch.full((3,), 8), emb).user_vectors)


@pytest.mark.parametrize("style, position_from", [("recbole", "start"), ("sasrec", "end")])
def test_sequences_of_200_items_stay_causal(style, position_from):
    model, cfg = _sasrec(max_seq_len=200, sequence_mode="all_positions", router_causal=True, block_style=style,
                         position_from=position_from)
    model.eval()
    seq = torch.randint(1, 500, (2, 200))
    emb = torch.randn(2, 200, cfg.hidden_size)
    hidden = model(seq, torch.full((2,), 200), emb).user_vectors  # [B, 200, 1, d]
    changed = emb.clone()
    changed[:, 150:] = torch.randn(2, 50, cfg.hidden_size)
    again = model(seq, torch.full((2,), 200), changed).user_vectors
    torch.testing.assert_close(hidden[:, :150], again[:, :150])  # no position reads a later one
    assert not torch.allclose(hidden[:, 150:], again[:, 150:])
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(name="sasrec", hidden_size=64, num_heads=3)


@pytest.mark.parametrize("size, blocks, heads", [(32, 1, 1), (64, 3, 4)])
def test_embedding_size_blocks_and_heads_shape_the_model(size, blocks, heads):
    model, cfg = _sasrec(hidden_size=size, num_layers=blocks, num_heads=heads, ffn_inner_size=4 * size)
    assert len(model.encoder.blocks) == blocks and model.encoder.blocks[0].attention.heads == heads
    seq = torch.randint(1, 30, (2, 5))
    out = model(seq, torch.full((2,), 5), torch.randn(2, 5, size)).user_vectors
    assert out.shape == (2, 1, size)


def test_the_original_sasrec_block_and_inverse_positions():
    """block_style=sasrec: no input norm, pre-LN ReLU blocks, a final LayerNorm; position_from=end: the latest item
    of every row gets position 0, whatever the row's length. CAMMSR refuses both (not wired there)."""
    model, cfg = _sasrec(block_style="sasrec", position_from="end", ffn_inner_size=16)
    encoder = model.encoder
    assert isinstance(encoder.input_norm, torch.nn.Identity) and isinstance(encoder.final_norm, torch.nn.LayerNorm)
    assert isinstance(encoder.blocks[0].ffn[1], torch.nn.ReLU) and encoder.blocks[0].ffn[0].out_features == 16
    seq = torch.tensor([[5, 6, 7, 0], [1, 2, 3, 4]])
    positions = model._positions(seq, torch.tensor([3, 4]))
    table = model.position.weight
    torch.testing.assert_close(positions[0, :3], table[[2, 1, 0]])
    torch.testing.assert_close(positions[1], table[[3, 2, 1, 0]])
    recbole, _ = _sasrec()
    assert isinstance(recbole.encoder.final_norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="block_style='sasrec': is a SASRec option"):
        ModelConfig(name="cammsr", block_style="sasrec")
