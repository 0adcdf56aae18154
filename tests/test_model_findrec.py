"""FindRec (model.name=findrec): the selective scan, the RBF kernel and its bandwidth, the Stein gradient estimator,
cross-attention with expert routing, the IICM batch term, causality and padding, losses and gradients, and
2 processes == 1 process."""

import math
import subprocess

import pytest
import torch
import torch.nn.functional as F

from cammsr import ModelConfig, SampledCandidates, build_model, init_id_table_
from cammsr.findrec import (CrossModalRouting, IICM, entropy_surrogate, kernel_width, rbf_similarity,
                            selective_scan, stein_score)
from conftest import PY, ROOT, cpu_env, random_sequences, write_tiny_dataset
from train.parity import compare

NUM_ITEMS, TEXT_DIM, IMAGE_DIM = 30, 10, 8
SMALL = dict(name="findrec", hidden_size=16, max_seq_len=8, ffn_inner_size=32, findrec_num_heads=4,
             findrec_state_size=4, findrec_num_experts=3)
NO_DROPOUT = dict(findrec_dropout=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Catalogue:
    """The trainer's item tables: ID rows and frozen text/image features (item 0 = padding)."""

    def __init__(self, d):
        self.id_table = torch.empty(NUM_ITEMS + 1, d)
        init_id_table_(self.id_table)
        self.text = torch.randn(NUM_ITEMS + 1, TEXT_DIM)
        self.image = torch.randn(NUM_ITEMS + 1, IMAGE_DIM)

    def inputs(self, item_seq, seq_len):
        return dict(item_seq=item_seq, seq_len=seq_len, id_emb=self.id_table[item_seq],
                    text_feat=self.text[item_seq], image_feat=self.image[item_seq])

    def candidates(self, model):
        return model.item_candidates(self.id_table, self.text, self.image)


def make(**overrides):
    cfg = ModelConfig(**{**SMALL, **overrides})
    return build_model(cfg, 0, TEXT_DIM, IMAGE_DIM), Catalogue(cfg.hidden_size)


def sequences(lengths, length=8):
    return random_sequences(len(lengths), length, lengths, NUM_ITEMS)


def next_item_targets(item_seq):
    return torch.cat([item_seq[:, 1:], torch.zeros(item_seq.shape[0], 1, dtype=torch.long)], dim=1)


# ---------------------------------------------------------------- Mamba's selective scan

def test_selective_scan_is_the_step_by_step_recurrence():
    batch, length, channels, state = 2, 4, 3, 2
    u = torch.randn(batch, length, channels)
    delta = torch.rand(batch, length, channels) + 0.1
    decay_rate = -torch.rand(channels, state) - 0.5
    b_in, c_out = torch.randn(batch, length, state), torch.randn(batch, length, state)
    expected = torch.zeros(batch, length, channels)
    for b in range(batch):
        for e in range(channels):
            h = [0.0] * state
            for t in range(length):
                for n in range(state):
                    step = delta[b, t, e]
                    h[n] = math.exp(step * decay_rate[e, n]) * h[n] + step * b_in[b, t, n] * u[b, t, e]
                expected[b, t, e] = sum(c_out[b, t, n] * h[n] for n in range(state))
    torch.testing.assert_close(selective_scan(u, delta, decay_rate, b_in, c_out), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Eq. 1: RBF kernel, bandwidth, Stein estimator

def test_rbf_kernel_and_median_bandwidth_on_three_points():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # pairwise distances 3, 4, 5: median 4
    assert kernel_width(points, "median").item() == pytest.approx(2 * 16)  # 2 sigma^2, sigma = 4
    assert kernel_width(points, "svgd").item() == pytest.approx(16 / math.log(4))
    similarity = rbf_similarity(points[:2], points[1:], torch.tensor(32.0))  # pairs (0, 1) and (1, 2)
    torch.testing.assert_close(similarity, torch.tensor([math.exp(-9 / 32), math.exp(-25 / 32)]))


def test_stein_score_is_li_and_turners_estimator():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    width, eta = torch.tensor(3.0, dtype=torch.float64), 0.1
    kernel = torch.tensor([[math.exp(-((x[i] - x[j]) ** 2).sum().item() / 3.0) for j in range(3)] for i in range(3)],
                          dtype=torch.float64)
    # <grad, K>_i = sum_j d/dx_j exp(-||x_i - x_j||^2 / w) = sum_j K_ij * 2 (x_i - x_j) / w
    kernel_gradient = torch.stack([sum(kernel[i, j] * 2 * (x[i] - x[j]) / 3.0 for j in range(3)) for i in range(3)])
    expected = -torch.linalg.inv(kernel + eta * torch.eye(3, dtype=torch.float64)) @ kernel_gradient
    torch.testing.assert_close(stein_score(x, width, eta), expected)


def test_stein_score_recovers_the_gaussian_score():
    x = torch.randn(300, 2, dtype=torch.float64)
    score = stein_score(x, kernel_width(x, "median"), 0.01)
    central = x.norm(dim=1) < 1.5  # grad log N(0, I) = -x; kernel estimators are weakest in the tails
    assert F.cosine_similarity(score[central], -x[central]).mean() > 0.85


def test_entropy_surrogate_is_zero_valued_with_the_stein_gradient():
    z = torch.randn(5, 3, requires_grad=True)
    surrogate = entropy_surrogate(z, "median", 0.01)
    surrogate.backward()
    assert surrogate.item() == 0.0
    score = stein_score(z.detach(), kernel_width(z, "median"), 0.01)
    torch.testing.assert_close(z.grad, -score / 5)  # dH/dz_i = -score_i / n


# ---------------------------------------------------------------- Sec 2.3: cross-attention and expert routing

def _hand_routing(attend_over_sequence: bool) -> CrossModalRouting:
    """d = 4, H = 2 heads of 2, K = 2 experts of multiplier 1: router logits (O^h_0, 0); expert k is (k + 1) GELU(x)."""
    cfg = ModelConfig(**{**SMALL, "hidden_size": 4, "findrec_num_heads": 2, "findrec_num_experts": 2,
                         "findrec_expert_multiplier": 1,
                         "findrec_cross_attention": "causal_sequence" if attend_over_sequence else "single_key"})
    routing = CrossModalRouting(cfg)
    with torch.no_grad():
        routing.router.weight.zero_()
        routing.router.weight[:, 0, 0] = 1.0
        routing.router.bias.zero_()
        routing.experts.w1.copy_(torch.eye(2).expand(1, 2, 2, 2))
        routing.experts.b1.zero_()
        routing.experts.w2.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)])[None])
        routing.experts.b2.zero_()
    return routing


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _routed(o: list[float]) -> list[float]:
    """E^h for one head's O^h: softmax(O^h_0, 0) over the two experts, expert k = (k + 1) GELU."""
    g0 = math.exp(o[0]) / (math.exp(o[0]) + 1)
    return [(g0 * 1 + (1 - g0) * 2) * _gelu(v) for v in o]


def test_cross_attention_with_expert_routing_by_hand():
    z_img = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]])  # [B=1, L=2, d=4], heads (x0 x1 | x2 x3)
    z_txt = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 2.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    output, gates = _hand_routing(True)(z_img, z_txt, valid)
    # position 0 sees text position 0 alone; position 1 attends over text positions 0 and 1
    head0_pos1 = [math.exp(1 / math.sqrt(2)), math.exp(0.0)]  # scores (0,1).(1,1)/sqrt2 and (0,1).(2,0)/sqrt2
    head1_pos1 = [math.exp(0.0), math.exp(0.0)]  # (1,0).(0,0) and (1,0).(0,2)
    a0 = [s / sum(head0_pos1) for s in head0_pos1]
    a1 = [s / sum(head1_pos1) for s in head1_pos1]
    o_pos0 = [[1 + 1, 0 + 1], [0 + 0, 1 + 0]]
    o_pos1 = [[0 + a0[0] * 1 + a0[1] * 2, 1 + a0[0] * 1], [1 + a1[0] * 0 + a1[1] * 0, 0 + a1[1] * 2]]
    expected = torch.tensor([[sum((_routed(o) for o in o_pos0), []), sum((_routed(o) for o in o_pos1), [])]])
    torch.testing.assert_close(output, expected)
    g = math.exp(o_pos1[1][0]) / (math.exp(o_pos1[1][0]) + 1)
    torch.testing.assert_close(gates[0, 1, 1], torch.tensor([g, 1 - g]))

    single, _ = _hand_routing(False)(z_img, z_txt, valid)  # the literal one-key reading: O^h = z_img^h + z_txt^h
    o_single = (z_img + z_txt)[0].tolist()
    expected_single = torch.tensor([[_routed(o[:2]) + _routed(o[2:]) for o in o_single]])
    torch.testing.assert_close(single, expected_single)


def test_the_heads_routing_weights_are_the_outputs_expert_weights():
    model, catalogue = make(**NO_DROPOUT)
    item_seq, seq_len = sequences([8, 3])
    output = model(**catalogue.inputs(item_seq, seq_len))
    assert output.expert_groups == ("head0", "head1", "head2", "head3")
    assert output.expert_weights.shape == (2, 8, 4, 3)
    torch.testing.assert_close(output.expert_weights.sum(-1), torch.ones(2, 8, 4))
    usage = output.expert_usage()  # the mean over the 11 valid positions only
    valid = output.expert_weights[item_seq != 0]
    torch.testing.assert_close(usage, valid.mean(0))


# ---------------------------------------------------------------- causality and padding

@pytest.mark.parametrize("encoder", ["mamba", "mlp"])
def test_all_positions_mode_leaks_nothing_from_later_positions(encoder):
    model, catalogue = make(sequence_mode="all_positions", findrec_modality_encoder=encoder, **NO_DROPOUT)
    model.eval()
    item_seq, seq_len = sequences([8, 8])
    before = model(**catalogue.inputs(item_seq, seq_len)).user_vectors
    changed = item_seq.clone()
    changed[:, 5] = changed[:, 5] % NUM_ITEMS + 1
    after = model(**catalogue.inputs(changed, seq_len)).user_vectors
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_prefix_mode_reads_the_last_valid_position_of_the_all_positions_output():
    prefix, catalogue = make(**NO_DROPOUT)
    every, _ = make(sequence_mode="all_positions", **NO_DROPOUT)
    every.load_state_dict(prefix.state_dict())
    prefix.eval(), every.eval()
    item_seq, seq_len = sequences([8, 4, 1])
    inputs = catalogue.inputs(item_seq, seq_len)
    last = every(**inputs).user_vectors[torch.arange(3), seq_len - 1]
    torch.testing.assert_close(prefix(**inputs).user_vectors, last, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, anchors", [("prefix", "last"), ("all_positions", "every_position")])
def test_padding_content_changes_no_output_and_no_iicm_value(mode, anchors):
    model, catalogue = make(sequence_mode=mode, findrec_iicm_anchors=anchors, **NO_DROPOUT)
    model.train()  # no dropout: train mode only adds the IICM term
    item_seq, seq_len = sequences([8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    noisy = {key: value.clone() for key, value in inputs.items()}
    pad = item_seq == 0
    for key in ("id_emb", "text_feat", "image_feat"):
        noisy[key][pad] = torch.randn_like(noisy[key][pad]) * 50
    clean, dirty = model(**inputs), model(**noisy)
    valid = ~pad
    if mode == "prefix":
        torch.testing.assert_close(clean.user_vectors, dirty.user_vectors)
    else:
        torch.testing.assert_close(clean.user_vectors[valid], dirty.user_vectors[valid])
    real = torch.ones(3, dtype=torch.bool)
    (term,), (noisy_term,) = clean.batch_terms, dirty.batch_terms
    torch.testing.assert_close(term.fn(term.tensors, real), noisy_term.fn(noisy_term.tensors, real))


# ---------------------------------------------------------------- the IICM batch term

def _iicm_by_definition(z_img, z_txt, entropy_weight):
    """Eq. 1-2 read as 1 - E[K] on normalised rows, 2 sigma^2 = 2 median^2 of the pooled pairwise distances, minus the
    entropy surrogate whose gradient is -score / n for each modality (scores by the estimator's formula)."""
    img, txt = F.normalize(z_img, dim=-1), F.normalize(z_txt, dim=-1)
    pooled = torch.cat([img, txt]).detach()
    n = pooled.shape[0]
    distances = torch.stack([(pooled[i] - pooled[j]).norm() for i in range(n) for j in range(i + 1, n)])
    width = 2 * distances.sort().values[(len(distances) - 1) // 2] ** 2
    alignment = 1 - torch.exp(-((img - txt) ** 2).sum(-1) / width).mean()
    entropy = 0
    for z in (img, txt):
        rows = z.detach()
        own = torch.stack([(rows[i] - rows[j]).norm() for i in range(len(rows)) for j in range(i + 1, len(rows))])
        w = 2 * own.sort().values[(len(own) - 1) // 2] ** 2
        kernel = torch.exp(-torch.cdist(rows, rows) ** 2 / w)
        gradient = torch.stack([sum(kernel[i, j] * 2 * (rows[i] - rows[j]) / w for j in range(len(rows)))
                                for i in range(len(rows))])
        score = -torch.linalg.solve(kernel + 0.01 * torch.eye(len(rows)), gradient)
        entropy = entropy - (score * (z - rows)).sum(-1).mean()
    return alignment - entropy_weight * entropy


@pytest.mark.parametrize("mode, anchors", [("prefix", "last"), ("all_positions", "every_position"),
                                           ("all_positions", "last")])
def test_iicm_batch_term_equals_its_definition(mode, anchors):
    model, catalogue = make(sequence_mode=mode, findrec_iicm_anchors=anchors, findrec_iicm_weight=0.3,
                            findrec_entropy_weight=0.5, **NO_DROPOUT)
    item_seq, seq_len = sequences([8, 5, 2, 3])
    branches = {}
    model.image_encoder.register_forward_hook(lambda module, args, out: branches.__setitem__("image", out))
    model.text_encoder.register_forward_hook(lambda module, args, out: branches.__setitem__("text", out))
    (term,) = model(**catalogue.inputs(item_seq, seq_len)).batch_terms
    assert term.name == "iicm" and term.weight == 0.3
    real = torch.tensor([True, True, False, True])  # the third row pads the batch: it is no anchor
    if anchors == "last":
        rows = (torch.arange(4)[real], (seq_len - 1)[real])
    else:
        keep = (item_seq > 0) & real[:, None]
        rows = keep.nonzero(as_tuple=True)
    z_img, z_txt = branches["image"][rows], branches["text"][rows]
    got, expected = term.fn(term.tensors, real), _iicm_by_definition(z_img, z_txt, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    parameters = [p for p in model.text_encoder.parameters()]
    for a, b in zip(torch.autograd.grad(got, parameters, retain_graph=True),
                    torch.autograd.grad(expected, parameters)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_iicm_directions_and_when_the_term_is_produced():
    z_img, z_txt = torch.randn(6, 4), torch.randn(6, 4)
    align = IICM("align", "median", 0.0, 0.01, True).loss(z_img, z_txt)
    as_written = IICM("as_written", "median", 0.0, 0.01, True).loss(z_img, z_txt)
    assert align.item() == pytest.approx(1 - as_written.item())
    model, catalogue = make()
    item_seq, seq_len = sequences([8, 5])
    model.eval()
    assert model(**catalogue.inputs(item_seq, seq_len)).batch_terms == []
    off, _ = make(findrec_iicm_weight=0.0)
    assert off(**catalogue.inputs(item_seq, seq_len)).batch_terms == []


# ---------------------------------------------------------------- losses (Eq. 5), candidates and gradients

def test_full_softmax_loss_is_recommendation_plus_lambda_iicm_and_reaches_every_parameter():
    model, catalogue = make(findrec_iicm_weight=0.5)
    item_seq, seq_len = sequences([8, 5, 2, 6])
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    output = model(**catalogue.inputs(item_seq, seq_len))
    assert output.user_vectors.shape == (4, 3, 16)
    terms = model.loss(output, targets, candidates=catalogue.candidates(model))
    (term,) = output.batch_terms
    iicm = term.fn(term.tensors, torch.ones(4, dtype=torch.bool))
    assert terms.auxiliary.item() == pytest.approx(0.5 * iicm.item())
    assert terms.total.item() == pytest.approx(terms.recommendation.item() + 0.5 * iicm.item())
    terms.total.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_the_iicm_trains_the_content_branches_only():
    model, catalogue = make()
    item_seq, seq_len = sequences([8, 5, 2, 6])
    (term,) = model(**catalogue.inputs(item_seq, seq_len)).batch_terms
    term.fn(term.tensors, torch.ones(4, dtype=torch.bool)).backward()
    reached = {name.split(".")[0] for name, p in model.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"items", "text_encoder", "image_encoder"}


@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_sampled_softmax_loss_runs_and_trains(mode):
    model, catalogue = make(sequence_mode=mode, loss_type="sampled_softmax")
    item_seq, seq_len = sequences([8, 5, 2])
    targets = torch.randint(1, NUM_ITEMS + 1, (3,)) if mode == "prefix" else next_item_targets(item_seq)
    output = model(**catalogue.inputs(item_seq, seq_len))
    candidates = catalogue.candidates(model)
    scored = targets.reshape(-1)[targets.reshape(-1) > 0]
    negatives = torch.randint(1, NUM_ITEMS + 1, (7,))
    sampled = SampledCandidates(candidates[scored], candidates[negatives], negatives,
                                torch.full((7,), math.log(1 / NUM_ITEMS)))
    terms = model.loss(output, targets, sampled=sampled)
    assert torch.isfinite(terms.total) and terms.auxiliary > 0
    terms.total.backward()
    assert model.fusion[0].weight.grad.abs().sum() > 0 and model.id_encoder.layers[0].mixer.dt_bias.grad is not None


def test_id_candidates_score_against_the_id_table_alone():
    model, catalogue = make(findrec_candidates="id")
    item_seq, seq_len = sequences([8, 5])
    output = model(**catalogue.inputs(item_seq, seq_len))
    candidates = catalogue.candidates(model)
    assert output.user_vectors.shape == (2, 1, 16) and torch.equal(candidates[:, 0], catalogue.id_table)


def test_config_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="modalities"):
        ModelConfig(name="findrec", modalities=("id", "text"))
    with pytest.raises(ValueError, match="findrec_num_heads"):
        ModelConfig(name="findrec", hidden_size=16, findrec_num_heads=3)
    with pytest.raises(ValueError, match="findrec_bandwidth"):
        ModelConfig(name="findrec", findrec_bandwidth="silverman")
    with pytest.raises(ValueError, match="findrec_stein_eta"):
        ModelConfig(name="findrec", findrec_stein_eta=0.0)


# ---------------------------------------------------------------- 2 processes == 1 process

# Tiny FindRec, fp32, no dropout: nothing random differs between ranks. lambda 0.5 so that the IICM's global-batch
# gradient is a visible part of what must match; Adam eps 1e-3 as in test_train_distributed.
TINY_FINDREC = ["train.precision=fp32", "train.eps=0.001", "model.name=findrec", "model.hidden_size=8",
                "model.max_seq_len=6", "model.ffn_inner_size=16", "model.findrec_num_layers=1",
                "model.findrec_state_size=4", "model.findrec_num_heads=2", "model.findrec_num_experts=2",
                "model.findrec_dropout=0.0", "model.findrec_iicm_weight=0.5", "train.batch_size=64",
                "data.build_features=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


ALL_POSITIONS = ["train.batch_size=48", "train.batch_unit=targets", "model.sequence_mode=all_positions",
                 "model.findrec_iicm_anchors=every_position"]


@pytest.mark.parametrize("mode, stage", [([], "3"), (ALL_POSITIONS, "1")], ids=["prefix", "all_positions"])
def test_two_processes_equal_one_process(dataset, tmp_path, mode, stage):
    """Same global batches at ZeRO 3 (prefix) and ZeRO 1 (all positions): losses, ID table and dense weights within
    1e-5, metrics identical; the IICM is computed on the gathered global batch (all_positions: its [B, L, d] rows
    padded to max_seq_len on each rank)."""
    dumps = {}
    for nproc in (1, 2):
        out = tmp_path / f"findrec{nproc}.pt"
        proc = subprocess.run([str(ROOT / "launch" / "single_node.sh"), "--nproc", str(nproc), "--python", PY,
                               "--module", "train.parity", "--", "--data", str(dataset), "--out", str(out),
                               "--steps", "3", "--stages", stage, *TINY_FINDREC, *mode],
                              cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        dumps[nproc] = torch.load(out, weights_only=False)
    assert dumps[2][int(stage)]["world_size"] == 2
    assert compare(dumps[1], dumps[2], 1e-5) == []
