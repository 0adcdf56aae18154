"""HM4SR (cammsr/hm4sr.py): its equations on hand-computed cases, causality, masks, its auxiliary tasks, its
switches, and 2 real processes == 1 through the trainer."""
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from cammsr import flops_per_sample
from cammsr.base import SampledCandidates
from cammsr.config import ModelConfig
from cammsr.factory import build_model
from cammsr.hm4sr import InteractiveMoE, TemporalMoE, TimeEmbeddings
from cammsr.mscl import info_nce
from conftest import PY, ROOT, cpu_env, write_tiny_dataset
from train.parity import compare

DAY = 86400.0
TEXT_DIM, IMAGE_DIM, CATEGORIES = 5, 3, 4


def _cfg(**overrides) -> ModelConfig:
    base = dict(name="hm4sr", hidden_size=4, max_seq_len=6, num_layers=1, num_heads=1, ffn_inner_size=8,
                hidden_dropout=0.0, attn_dropout=0.0, hm4sr_interactive_experts=2, hm4sr_temporal_experts=3)
    return ModelConfig(**{**base, **overrides})


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(_cfg(**overrides), CATEGORIES, TEXT_DIM, IMAGE_DIM)


def _inputs(batch=3, length=5, seed=1):
    """Left-aligned sequences with padding at the end, their features, categories and day-spaced times."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, 3, 1][:batch])
    item_seq = torch.randint(1, 9, (batch, length), generator=g)
    valid = torch.arange(length)[None, :] < lengths[:, None]
    item_seq = item_seq * valid
    days = torch.cumsum(torch.randint(0, 40, (batch, length), generator=g), dim=1).double() + 19000
    time_seq = days * DAY * valid
    id_emb = torch.randn(batch, length, 4, generator=g) * valid[..., None]
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    image = torch.randn(batch, length, IMAGE_DIM, generator=g)
    cats = (torch.rand(batch, length, CATEGORIES, generator=g) < 0.4).float()
    has = valid.clone()
    return item_seq, lengths, id_emb, text, image, cats, has, time_seq


def test_interval_buckets_and_absolute_time_code_follow_eq_11_to_13():
    emb = TimeEmbeddings(_cfg())
    times = torch.tensor([[0.0, 1, 3, 3, 0]]) * DAY
    valid = torch.tensor([[True, True, True, True, False]])
    expected = [0, math.floor(100 * math.log(2)), math.floor(100 * math.log(3)), 0, 0]
    assert emb.intervals(times, valid).tolist() == [expected]
    assert emb.num_buckets == math.floor(100 * math.log(3651)) + 1  # 10 years share the last bucket
    assert emb.intervals(torch.tensor([[0.0, 20000 * DAY]]), torch.ones(1, 2, dtype=torch.bool))[0, 1] == \
        emb.num_buckets - 1
    code = emb.absolute(torch.tensor([[2.0 * DAY]]))[0, 0]
    assert torch.allclose(code, torch.tensor([math.cos(2.0 / 10000 ** (j / 4)) for j in range(4)]), atol=1e-6)


def test_interactive_moe_is_eq_8_to_10_on_a_hand_case():
    moe = InteractiveMoE(num_modalities=2, d=1, num_experts=2, alpha_init=0.5)
    with torch.no_grad():
        moe.expert_weight.copy_(torch.tensor([[[[1.0], [2.0]], [[0.0], [1.0]]],   # modality 0: experts [1,2], [0,1]
                                              [[[1.0], [0.0]], [[3.0], [0.0]]]]))  # modality 1: experts [1,0], [3,0]
        moe.expert_bias.copy_(torch.tensor([[[0.0], [1.0]], [[0.0], [0.0]]]))
        moe.router_weight.copy_(torch.tensor([[[1.0, -1.0]], [[0.0, 0.0]]]))
        moe.router_bias.zero_()
    e = torch.tensor([[[[1.0], [2.0]]]])  # e_0 = 1, e_1 = 2
    out, gates = moe(e)
    g0 = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    mixed0 = g0[0] * (1 * 1 + 2 * 2) + g0[1] * (0 * 1 + 1 * 2 + 1)
    mixed1 = 0.5 * (1 * 1 + 0 * 2) + 0.5 * (3 * 1 + 0 * 2)
    assert torch.allclose(out.flatten(), torch.tensor([1 + 0.5 * mixed0, 2 + 0.5 * mixed1]))
    assert torch.allclose(gates[0, 0, 0], g0)


def test_temporal_moe_mixes_element_wise_experts_by_the_time_router():
    torch.manual_seed(3)
    moe = TemporalMoE(num_modalities=2, d=2, time_width=3, num_experts=3)
    with torch.no_grad():
        moe.expert_weight.normal_()
    e, time_emb = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 3)
    out, gates = moe(e, time_emb)
    gates_expected = torch.softmax(moe.router(time_emb), -1)
    literal = sum(gates_expected[..., i, None] * (moe.expert_weight[i] * e.flatten(-2)) for i in range(3))
    assert torch.allclose(out, literal.view_as(e), atol=1e-6) and torch.allclose(gates, gates_expected)


@pytest.mark.parametrize("overrides", [{}, {"hm4sr_interactive_moe": False}, {"hm4sr_time_inputs": ["interval"]}])
def test_all_positions_mode_is_causal_and_padding_changes_nothing(overrides):
    model = _model(sequence_mode="all_positions", **overrides).eval()
    item_seq, lengths, id_emb, text, image, cats, has, time_seq = _inputs()
    base = model(item_seq, lengths, id_emb, text, image, cats, has, time_seq).user_vectors
    later = [t.clone() for t in (item_seq, id_emb, text, image, time_seq)]
    later[0][0, 3:] = 7
    later[1][0, 3:] += 1.0
    later[2][0, 3:] -= 2.0
    later[3][0, 3:] *= 3.0
    later[4][0, 3:] += 500 * DAY
    changed = model(later[0], lengths, later[1], later[2], later[3], cats, has, later[4]).user_vectors
    assert torch.allclose(base[0, :3], changed[0, :3], atol=1e-6)
    assert not torch.allclose(base[0, 3:], changed[0, 3:])
    padded = model(*(torch.cat([t, torch.zeros_like(t[:, :1])], dim=1) if t.dim() > 1 else t for t in
                     (item_seq, lengths, id_emb, text, image, cats, has, time_seq))).user_vectors
    valid = item_seq != 0
    assert torch.allclose(base[valid], padded[:, :5][valid], atol=1e-6)


def test_prefix_mode_reads_the_last_position_of_all_positions_mode():
    item_seq, lengths, id_emb, text, image, cats, has, time_seq = _inputs()
    every = _model(sequence_mode="all_positions").eval()(item_seq, lengths, id_emb, text, image, cats, has, time_seq)
    last = _model(sequence_mode="prefix").eval()(item_seq, lengths, id_emb, text, image, cats, has, time_seq)
    assert torch.allclose(last.user_vectors, every.user_vectors[torch.arange(3), lengths - 1], atol=1e-6)
    assert last.user_vectors.shape == (3, 3, 4)


def test_the_temporal_moe_needs_times_and_its_ablation_runs_without():
    item_seq, lengths, id_emb, text, image, cats, has, _ = _inputs()
    with pytest.raises(ValueError, match="needs the interaction timestamps"):
        _model()(item_seq, lengths, id_emb, text, image, cats, has, None)
    model = _model(hm4sr_temporal_moe=False)
    assert model.temporal is None and model.placeholders is None
    output = model(item_seq, lengths, id_emb, text, image, cats, has, None)
    assert [term.name for term in output.batch_terms] == ["cp"]


def _training_output(model, *inputs):
    model.train()
    return model(*inputs)


def test_category_prediction_is_eq_21_22_in_both_reductions():
    inputs = _inputs()
    item_seq, lengths, id_emb, text, image, cats, has, time_seq = inputs
    valid = item_seq != 0
    real = torch.ones(3, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        model = _model(hm4sr_cp_reduction=reduction, hm4sr_pcl_weight=0.0, hm4sr_idcl_weight=0.0)
        output = _training_output(model, *inputs)
        (term,) = output.batch_terms
        model.eval()
        x_temp, _ = model.temporal(model.interactive(model.items(id_emb, text, image)[1])[0],
                                   model.time(time_seq, valid))
        bce = F.binary_cross_entropy_with_logits(model.category_head(x_temp.flatten(-2))[valid], cats[valid],
                                                 reduction="sum")
        expected = bce / 3 if reduction == "sum" else bce / (valid.sum() * CATEGORIES)
        assert term.fn(term.tensors, real).item() == pytest.approx(expected.item(), rel=1e-5)


def test_idcl_is_eq_23_on_the_targets_and_pcl_without_placeholders_contrasts_a_view_with_itself():
    inputs = _inputs()
    model = _model(hm4sr_pcl_ratio=0.0, hm4sr_cp_weight=0.0, hm4sr_idcl_temperature=0.2)
    output = _training_output(model, *inputs)
    assert [c.name for c in output.target_contrasts] == ["idcl"]
    candidates = model.item_candidates(torch.randn(10, 4), torch.randn(10, TEXT_DIM), torch.randn(10, IMAGE_DIM))
    targets = torch.tensor([4, 0, 9])
    terms = {term.name: term for term in output.all_batch_terms(targets, candidates)}
    real = torch.ones(3, dtype=torch.bool)
    user_id = output.user_vectors[:, 0]
    scored = targets > 0
    expected = info_nce(user_id[scored], candidates[targets[scored], 0], temperature=0.2)
    assert terms["idcl"].fn(terms["idcl"].tensors, real).item() == pytest.approx(expected.item(), rel=1e-6)
    views = terms["pcl"].tensors  # (H^txt, H^txt,1, H^img, H^img,1): with beta = 0 each pair is one vector twice
    assert len(views) == 4 and all(torch.allclose(views[i], views[i + 1], atol=1e-6) for i in (0, 2))
    same = (info_nce(views[0], views[0]) + info_nce(views[2], views[2])) / 2
    assert terms["pcl"].fn(views, real).item() == pytest.approx(same.item(), rel=1e-6)


def test_placeholders_replace_every_item_at_beta_one():
    item_seq, lengths, id_emb, text, image, cats, has, time_seq = _inputs()
    model = _model(hm4sr_pcl_ratio=1.0)
    valid = item_seq != 0
    time_emb = model.time(time_seq, valid)
    x_temp = torch.randn(3, 5, 3, 4)
    augmented = model._placeholder_views(x_temp, time_emb, valid)
    for m in range(3):
        assert torch.allclose(augmented[:, :, m][valid], model.placeholders[m](time_emb)[valid])
    assert torch.equal(augmented[~valid], x_temp[~valid])


@pytest.mark.parametrize("loss_type", ["full_softmax", "sampled_softmax"])
def test_loss_reaches_every_component(loss_type):
    model = _model(loss_type=loss_type, sequence_mode="all_positions")
    inputs = _inputs()
    output = _training_output(model, *inputs)
    id_rows = torch.randn(10, 4, requires_grad=True)
    candidates = model.item_candidates(id_rows, torch.randn(10, TEXT_DIM), torch.randn(10, IMAGE_DIM))
    targets = torch.randint(1, 10, inputs[0].shape) * (inputs[0] != 0)
    if loss_type == "full_softmax":
        terms = model.loss(output, targets, candidates=candidates)
    else:
        negatives = torch.tensor([2, 5, 7])
        sampled = SampledCandidates(candidates[targets[targets > 0]], candidates[negatives], negatives,
                                    sampling_rate=3 / 9)
        terms = model.loss(output, targets, sampled=sampled)
    assert terms.auxiliary.item() > 0
    assert terms.total.item() == pytest.approx(terms.recommendation.item() + terms.auxiliary.item(), rel=1e-6)
    terms.total.backward()
    for name in ("interactive.expert_weight", "interactive.alpha", "temporal.router.weight",
                 "temporal.expert_weight", "time.interval.weight", "time.time_scale", "placeholders.1.weight",
                 "category_head.weight", "items.projections.text.weight", "encoders.2.blocks.0.ffn.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert id_rows.grad.abs().sum() > 0


def test_config_refuses_what_hm4sr_cannot_run():
    with pytest.raises(ValueError, match="hm4sr_time_inputs"):
        _cfg(hm4sr_time_inputs=["weekday"])
    with pytest.raises(ValueError, match="'id' modality"):
        _cfg(modalities=["text", "image"])
    with pytest.raises(ValueError, match="hm4sr_pcl_ratio"):
        _cfg(hm4sr_pcl_ratio=1.5)


# The trainer tests' tiny setting for HM4SR: fp32, no dropout, every item replaced by its placeholder (beta = 1,
# so the augmentation draws nothing rank-dependent).
TINY_HM4SR = ["model.name=hm4sr", "train.precision=fp32", "train.eps=0.001", "model.hidden_size=8",
              "model.max_seq_len=6", "model.num_layers=1", "model.num_heads=1", "model.ffn_inner_size=16",
              "model.hidden_dropout=0.0", "model.attn_dropout=0.0", "model.hm4sr_interactive_experts=2",
              "model.hm4sr_temporal_experts=2", "model.hm4sr_pcl_ratio=1.0", "data.build_features=false"]


@pytest.mark.parametrize("mode, stage", [(["train.batch_size=64", "model.sequence_mode=prefix"], "3"),
                                         (["train.batch_size=48", "train.batch_unit=targets",
                                           "model.sequence_mode=all_positions"], "1")])
def test_two_processes_train_hm4sr_as_one(tmp_path, mode, stage):
    """Real gloo processes through train.parity: the per-step losses and weights of 2 ranks equal 1 rank's (ZeRO 3
    in prefix mode, ZeRO 1 in all-positions mode), with CP, IDCL and PCL computed on the global batch."""
    data = write_tiny_dataset(tmp_path / "tiny")
    dumps = {}
    for nproc in (1, 2):
        out = tmp_path / f"hm4sr{nproc}.pt"
        proc = subprocess.run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY,
                               "--module", "train.parity", "--", "--data", str(data), "--out", str(out), "--steps",
                               "3", "--stages", stage, *TINY_HM4SR, *mode],
                              cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        dumps[nproc] = torch.load(out, weights_only=False)
    assert compare(dumps[1], dumps[2], 1e-5) == []


def test_a_trained_run_recommends_from_history_and_times_as_evaluation_ranks(tmp_path, capsys):
    """`cammsr train model.name=hm4sr` end to end; the loaded best checkpoint reproduces the run's metrics through
    evaluation, `cammsr recommend --times` gives a user's evaluation top-1, and without times it stops naming why."""
    import json

    from launch.cli import main as cli_main
    from train.data import LocalSequences, eval_batches, eval_order
    from train.embeddings import TorchItemTable
    from train.evaluate import last_position
    from train.recommend import RunRecommender
    from train.step import model_inputs
    data, run = write_tiny_dataset(tmp_path / "tiny"), tmp_path / "run"
    proc = subprocess.run([PY, "-m", "train.command", "--data", str(data), "--run-dir", str(run), *TINY_HM4SR,
                           "train.batch_size=128", "max_epochs=2", "logging.tensorboard=false"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "aux " in proc.stdout + proc.stderr  # the epoch line reports the auxiliary tasks
    rec = RunRecommender(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert rec.evaluate("test") == metrics["test"]
    cfg, local = rec.cfg, LocalSequences(rec.data, 0, 1)
    table = TorchItemTable(rec.id_rows, "exact_sgd", 0.1, 1e-8, rec.device)
    with rec.as_trained(), torch.no_grad():
        batch = next(eval_batches(local, "test", cfg.model.max_seq_len, cfg.eval.batch_size))
        output = last_position(rec.model(*model_inputs(batch, table.lookup(batch.item_seq)[0], rec.items,
                                                       rec.dtype)), batch.seq_len)
    scores = output.flat_user_vectors() @ rec.candidates.flatten(1)[1:].T
    user = eval_order(local)[5]
    span = slice(local.offsets[user], local.offsets[user] + local.lengths[user] - 1)
    args = ["recommend", "--run", str(run), "--internal-ids", "--history", ",".join(map(str, local.flat[span])),
            "--include-history", "--k", "3", "--json"]
    capsys.readouterr()
    assert cli_main([*args, "--times", ",".join(map(str, local.flat_times[span]))]) == 0
    assert json.loads(capsys.readouterr().out)["recommendations"][0]["internal_id"] == int(scores[5].argmax()) + 1
    assert cli_main(args) == 2
    assert "reads the interaction times" in capsys.readouterr().err


def test_flops_per_sample_reads_the_times_of_the_temporal_moe():
    with_times = flops_per_sample(_model(), 8, CATEGORIES, TEXT_DIM, IMAGE_DIM, batch_size=2)
    without = flops_per_sample(_model(hm4sr_temporal_moe=False), 8, CATEGORIES, TEXT_DIM, IMAGE_DIM, batch_size=2)
    assert with_times["forward"] > without["forward"] > 0
    assert with_times["train_step"] > 2 * with_times["forward"]
