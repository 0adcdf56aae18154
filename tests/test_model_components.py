"""Each equation of the model checked against a direct computation written out here (small random inputs)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cammsr import ABLATIONS, ModelConfig, ranking_metric_sums, sums_to_means
from cammsr.camoe import AttentiveRouter, LinearRouter, ModalityExperts
from cammsr.category_guidance import CategoryGuidance
from cammsr.layers import DyT, init_weights_
from cammsr.mscl import info_nce, modality_swap
from cammsr.scoring import (full_softmax_cross_entropy, sampled_softmax_cross_entropy, target_ranks,
                            top_k_items)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _valid(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- DyT (Eq. 13)

def test_dyt_is_tanh_of_alpha_x():
    x = torch.randn(3, 5)
    dyt = DyT(5, alpha_init=0.7)
    assert torch.allclose(dyt(x), torch.tensor([[math.tanh(0.7 * v) for v in row] for row in x.tolist()]))
    affine = DyT(5, alpha_init=0.7, affine=True)
    with torch.no_grad():
        affine.weight.copy_(torch.arange(5.0))
        affine.bias.fill_(0.5)
    assert torch.allclose(affine(x), torch.tanh(0.7 * x) * torch.arange(5.0) + 0.5)


# ---------------------------------------------------------------- routers (Eq. 6-7)

def _router_reference(e, qkv, lengths, num_experts, causal):
    """Loop over batch, modality and query: softmax over the allowed key positions only."""
    batch, length, modalities, _ = e.shape
    out = torch.zeros(batch, length, modalities, num_experts)
    for b in range(batch):
        for m in range(modalities):
            wq, wk, wv = qkv[m, :, :num_experts], qkv[m, :, num_experts:2 * num_experts], qkv[m, :, 2 * num_experts:]
            q, k, v = e[b, :, m] @ wq, e[b, :, m] @ wk, e[b, :, m] @ wv
            for i in range(lengths[b]):
                keys = range(i + 1) if causal else range(lengths[b])
                scores = torch.stack([q[i] @ k[j] for j in keys]) / math.sqrt(num_experts)
                attention = torch.exp(scores) / torch.exp(scores).sum()
                out[b, i, m] = sum(a * v[j] for a, j in zip(attention, keys))
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attentive_router_matches_direct_attention_over_positions(causal):
    lengths, length, modalities, d, k = [6, 3, 1], 6, 3, 8, 4
    router = AttentiveRouter(modalities, d, k, normalize="none", causal=causal)
    init_weights_(router)
    e = torch.randn(3, length, modalities, d)
    got = router(e, _valid(lengths, length))
    expected = _router_reference(e, router.qkv.detach(), lengths, k, causal)
    for b, n in enumerate(lengths):
        assert torch.allclose(got[b, :n], expected[b, :n], atol=1e-5)


def test_attentive_router_ignores_padding_content_and_can_normalise():
    lengths, length = [4, 2], 5
    router = AttentiveRouter(2, 8, 3, normalize="softmax", causal=False)
    init_weights_(router)
    e = torch.randn(2, length, 2, 8)
    changed = e.clone()
    changed[1, 2:] = 100.0
    valid = _valid(lengths, length)
    a, b = router(e, valid), router(changed, valid)
    assert torch.allclose(a[1, :2], b[1, :2])
    assert torch.allclose(a.sum(-1), torch.ones(2, length, 2))
    raw = AttentiveRouter(2, 8, 3, normalize="none", causal=False)
    raw.qkv = router.qkv
    assert torch.allclose(a, torch.softmax(raw(e, valid), dim=-1))


def test_linear_router_is_softmax_of_affine_map():
    router = LinearRouter(2, 8, 3)
    init_weights_(router)
    with torch.no_grad():
        router.bias.normal_()
    e = torch.randn(2, 4, 2, 8)
    got = router(e, _valid([4, 4], 4))
    for m in range(2):
        logits = e[:, :, m] @ router.weight[m] + router.bias[m]
        assert torch.allclose(got[:, :, m], torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True), atol=1e-6)


# ---------------------------------------------------------------- experts (Eq. 5)

@pytest.mark.parametrize("variant", ["camoe", "moe", "cmoe"])
def test_experts_are_gate_weighted_ffns(variant):
    modalities, d, k, mult = 3, 4, 2, 4
    experts = ModalityExperts(variant, modalities, d, k, mult)
    init_weights_(experts)
    with torch.no_grad():
        experts.b1.normal_()
        experts.b2.normal_()
    e = torch.randn(2, 3, modalities, d)
    gates = torch.rand(2, 3, modalities, k)
    got = experts(e, gates)
    expected = torch.zeros_like(got)
    for m in range(modalities):
        pool = 0 if variant == "cmoe" else m
        x = torch.cat([e[..., j, :] for j in range(modalities)], -1) if variant == "camoe" else e[..., m, :]
        for expert in range(k):
            h = F.gelu(x @ experts.w1[pool, expert] + experts.b1[pool, expert])
            expert_out = h @ experts.w2[pool, expert] + experts.b2[pool, expert]
            expected[..., m, :] += gates[..., m, expert, None] * expert_out
    assert experts.w1.shape[2] == (modalities * d if variant == "camoe" else d)
    assert experts.w1.shape[3] == mult * d
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- category guidance (Eq. 8-10, V-K)

def _bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.mark.parametrize("pooling", ["max", "mean", "min"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_category_weights_are_softmax_of_pooled_bce(pooling, reduction, sign):
    levels = [0, 0, 1, 1, 1]
    cfg = ModelConfig(hidden_size=4, num_heads=1, category_levels=levels, category_pooling=pooling,
                      category_bce_reduction=reduction, category_weight_sign=sign)
    guidance = CategoryGuidance(cfg, num_categories=5)
    init_weights_(guidance)
    with torch.no_grad():
        guidance.bias.normal_()
    e = torch.randn(2, 3, 3, 4)
    labels = (torch.rand(2, 3, 5) < 0.4).float()
    has = torch.tensor([[True, False, True], [True, True, True]])
    valid = _valid([3, 2], 3)
    weights, _ = guidance(e, valid, labels, has)
    pool = {"max": max, "min": min, "mean": lambda xs: sum(xs) / len(xs)}[pooling]
    for b in range(2):
        for i in range(3):
            if not (valid[b, i] and has[b, i]):
                assert torch.allclose(weights[b, i], torch.full((3,), 1 / 3))
                continue
            differences = []
            for m in range(3):
                logits = (guidance.weight[m] @ e[b, i, m] + guidance.bias[m]).tolist()
                per_class = [_bce(1 / (1 + math.exp(-z)), y) for z, y in zip(logits, labels[b, i].tolist())]
                per_level = [per_class[:2], per_class[2:]]
                per_level = [sum(v) / (len(v) if reduction == "mean" else 1) for v in per_level]
                differences.append(pool(per_level))
            signed = [(1 if sign == "positive" else -1) * dd for dd in differences]
            expected = [math.exp(s) / sum(math.exp(t) for t in signed) for s in signed]
            assert torch.allclose(weights[b, i], torch.tensor(expected), atol=1e-5)


def test_category_guidance_single_level_is_plain_bce_sum_and_runs_in_fp32():
    cfg = ModelConfig(hidden_size=4, num_heads=1, category_bce_reduction="sum")
    guidance = CategoryGuidance(cfg, num_categories=3)
    init_weights_(guidance)
    e = torch.randn(1, 2, 3, 4)
    labels = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        difference, _ = guidance.differences(e.bfloat16(), labels)
    assert difference.dtype == torch.float32
    logits = torch.einsum("blmd,mcd->blmc", e.bfloat16().float(), guidance.weight) + guidance.bias
    probs = torch.sigmoid(logits)
    expected = -(labels[:, :, None] * probs.log() + (1 - labels[:, :, None]) * (1 - probs).log()).sum(-1)
    assert torch.allclose(difference, expected, atol=1e-5)


def test_category_guidance_without_labels_gives_equal_weights():
    cfg = ModelConfig(hidden_size=4, num_heads=1)
    guidance = CategoryGuidance(cfg, num_categories=3)
    weights, loss = guidance(torch.randn(2, 3, 3, 4), _valid([3, 3], 3), None, None)
    assert torch.equal(weights, torch.full((2, 3, 3), 1 / 3)) and loss.item() == 0.0


def test_category_levels_must_match_vocabulary():
    cfg = ModelConfig(category_levels=[0, 1])
    with pytest.raises(ValueError, match="category_levels"):
        CategoryGuidance(cfg, num_categories=3)


# ---------------------------------------------------------------- MSCL (Eq. 16-18)

def test_modality_swap_statistics_and_padding():
    batch, length, d = 400, 50, 3
    lengths = torch.randint(1, length + 1, (batch,)).tolist()
    valid = _valid(lengths, length)
    a, b = torch.randn(batch, length, d), torch.randn(batch, length, d)
    a_aug, b_aug, swapped = modality_swap(a, b, valid, prob=0.5)
    assert not swapped[~valid].any()
    fraction = swapped[valid].float().mean().item()
    assert abs(fraction - 0.5) < 0.02
    assert torch.equal(a_aug[swapped], b[swapped]) and torch.equal(b_aug[swapped], a[swapped])
    assert torch.equal(a_aug[~swapped], a[~swapped]) and torch.equal(b_aug[~swapped], b[~swapped])
    none = modality_swap(a, b, valid, prob=0.0)[2]
    everything = modality_swap(a, b, valid, prob=1.0)[2]
    assert not none.any() and torch.equal(everything, valid)


def test_info_nce_against_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    cos = [[(x @ y / (x.norm() * y.norm())).item() for y in b] for x in a]

    def direction(sim, tau):
        return [-math.log(math.exp(sim[i][i] / tau) / sum(math.exp(s / tau) for s in sim[i])) for i in range(3)]

    forward = direction(cos, 1.0)
    assert info_nce(a, b).item() == pytest.approx(sum(forward) / 3, rel=1e-6)
    assert info_nce(a, b, reduction="sum").item() == pytest.approx(sum(forward), rel=1e-6)
    transposed = [[cos[j][i] for j in range(3)] for i in range(3)]
    both = (sum(direction(cos, 0.5)) + sum(direction(transposed, 0.5))) / 6
    assert info_nce(a, b, temperature=0.5, bidirectional=True).item() == pytest.approx(both, rel=1e-6)
    # rows 0 and 1 in one group: each keeps its own positive, loses the other as a negative
    grouped = [-math.log(math.exp(cos[i][i]) / sum(math.exp(cos[i][j]) for j in range(3) if {i, j} != {0, 1}))
               for i in range(3)]
    assert info_nce(a, b, groups=torch.tensor([7, 7, 3])).item() == pytest.approx(sum(grouped) / 3, rel=1e-6)


# ---------------------------------------------------------------- scoring (Eq. 15, 19)

def _catalogue(num_items=37, modalities=3, d=4, users=6):
    user = torch.randn(users, modalities, d)
    candidates = torch.randn(num_items + 1, modalities, d)
    return user, candidates


def _eq15_logits(user, candidates):
    """Sum over modalities of per-modality dot products, items 1..N."""
    return sum(user[:, m] @ candidates[1:, m].T for m in range(user.shape[1]))


@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_cross_entropy_over_full_catalogue_chunked_equals_direct(chunk_size):
    user, candidates = _catalogue()
    targets = torch.tensor([1, 5, 37, 0, 12, 3])  # 0 = ignored row
    user.requires_grad_(True)
    candidates.requires_grad_(True)
    loss = full_softmax_cross_entropy(user.flatten(1), candidates.flatten(1), targets, chunk_size)
    loss.backward()
    grads = user.grad.clone(), candidates.grad.clone()
    user.grad, candidates.grad = None, None
    logits = _eq15_logits(user, candidates)
    keep = targets > 0
    expected = -torch.log_softmax(logits[keep], dim=1)[torch.arange(int(keep.sum())), targets[keep] - 1].mean()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grads[0], user.grad, atol=1e-5)
    assert torch.allclose(grads[1], candidates.grad, atol=1e-5)
    assert grads[1][0].abs().sum() == 0  # padding row is never a candidate


def test_target_ranks_count_strictly_greater_and_tied_scores_across_chunks():
    user, candidates = _catalogue()
    candidates[20] = candidates[7]  # an exact tie with target 7
    candidates[33] = candidates[7]
    targets = torch.tensor([7, 1, 37, 20, 15, 33])
    logits = _eq15_logits(user, candidates)
    target_logits = logits[torch.arange(6), targets - 1]
    expected = [1 + sum(s > target_logits[r] for s in logits[r]).item() for r in range(6)]
    expected_ties = [sum(s == target_logits[r] for s in logits[r]).item() for r in range(6)]
    assert expected_ties == [3, 1, 1, 3, 1, 3]
    for chunk_size in (3, 8, 1000):
        ranks = target_ranks(user.flatten(1), candidates.flatten(1), targets, chunk_size)
        assert ranks.rank.tolist() == expected and ranks.ties.tolist() == expected_ties
    offset = torch.randn(6)
    ranks = target_ranks(user.flatten(1), candidates.flatten(1), targets, 8, offset)
    assert ranks.rank.tolist() == expected and ranks.ties.tolist() == expected_ties


def test_top_k_chunked_equals_full_sort():
    user, candidates = _catalogue()
    logits = _eq15_logits(user, candidates)
    scores, ids = top_k_items(user.flatten(1), candidates.flatten(1), k=5, chunk_size=4)
    full_scores, full_index = logits.topk(5, dim=1)
    assert torch.allclose(scores, full_scores, atol=1e-6)
    assert torch.equal(ids, full_index + 1)


def test_sampled_softmax_with_logq_and_accidental_hits():
    user, candidates = _catalogue(num_items=10, users=3)
    targets = torch.tensor([2, 5, 9])
    negative_ids = torch.tensor([5, 1, 7, 2])
    log_q = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.4]))
    target_log_q = torch.log(torch.tensor([0.4, 0.1, 0.05]))
    got = sampled_softmax_cross_entropy(user.flatten(1), candidates[targets].flatten(1), targets,
                                        candidates[negative_ids].flatten(1), negative_ids, log_q, target_log_q)
    losses = []
    for r in range(3):
        score = lambda item: sum(float(user[r, m] @ candidates[item, m]) for m in range(3))
        positive = score(targets[r]) - float(target_log_q[r])
        negatives = [score(n) - float(q) for n, q in zip(negative_ids, log_q) if n != targets[r]]
        losses.append(-positive + math.log(math.exp(positive) + sum(math.exp(s) for s in negatives)))
    assert got.item() == pytest.approx(sum(losses) / 3, rel=1e-5)


# ---------------------------------------------------------------- metrics

def test_ranking_metric_sums_and_means():
    ranks = torch.tensor([1, 3, 11, 5, 7])
    sums = ranking_metric_sums(ranks, ks=(5, 10), valid=torch.tensor([True, True, True, True, False]))
    assert sums["count"].item() == 4
    assert sums["ndcg@5"].item() == pytest.approx(1 + 1 / math.log2(4) + 1 / math.log2(6))
    assert sums["mrr@10"].item() == pytest.approx(1 + 1 / 3 + 1 / 5)
    assert sums["recall@5"].item() == 3
    means = sums_to_means(sums)
    assert means["recall@10"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        sums_to_means(ranking_metric_sums(ranks, valid=torch.zeros(5, dtype=torch.bool)))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, field", [
    ({"num_heads": 3}, "num_heads"),
    ({"router": "dot"}, "router"),
    ({"sequence_mode": "all_positions"}, "router_causal"),
    ({"modalities": ["id", "audio"]}, "modalities"),
    ({"modalities": ["id", "text"]}, "mscl_pairs"),
    ({"mscl_pairs": [["id", "id"]]}, "mscl_pairs"),
    ({"mscl_pairs": [["id", "text"], ["text", "id"]]}, "mscl_pairs"),
    ({"hidden_dropout": 1.0}, "hidden_dropout"),
    ({"mscl_temperature": 0.0}, "mscl_temperature"),
    ({"category_pooling": "sum"}, "category_pooling"),
    ({"score_chunk_size": 2 ** 24 + 1}, "score_chunk_size"),
])
def test_config_rejects_impossible_settings_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        ModelConfig(**overrides)


def test_config_defaults_are_the_papers_and_ablations_are_valid():
    cfg = ModelConfig()
    assert (cfg.hidden_size, cfg.max_seq_len, cfg.num_layers, cfg.num_heads) == (64, 50, 2, 2)
    assert (cfg.num_experts, cfg.mscl_weight, cfg.mscl_swap_prob) == (4, 0.25, 0.5)
    assert len(cfg.mscl_pairs) == 3 and cfg.router == "attentive" and cfg.use_dyt
    for overrides in ABLATIONS.values():
        ModelConfig(**overrides)
    assert ModelConfig(mscl_pairs=[["id", "text"]]).mscl_pairs == (("id", "text"),)


def test_init_methods_scale_every_weight():
    from cammsr.layers import init_id_table_
    layer = torch.nn.Linear(256, 64)
    init_weights_(layer, "normal")  # RecBole's SASRec: N(0, 0.02) whatever the shape
    assert abs(layer.weight.std().item() - 0.02) < 0.002 and layer.bias.abs().max() == 0
    init_weights_(layer, "xavier_normal")  # the paper: std sqrt(2 / (fan_in + fan_out))
    assert abs(layer.weight.std().item() - (2 / 320) ** 0.5) < 0.008
    table = torch.empty(1000, 64)
    init_id_table_(table, "normal")
    assert table[0].abs().max() == 0 and abs(table[1:].std().item() - 0.02) < 0.002
