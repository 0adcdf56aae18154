"""Whole-model behaviour: fusion, causality, padding, gradients, mixed precision, overfitting, SASRec, profiling."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from cammsr import (ABLATIONS, ModelConfig, SampledCandidates, build_model, flops_per_sample, init_id_table_,
                    parameter_counts)
from cammsr.camoe import AttentiveRouter
from cammsr.layers import init_weights_
from cammsr.mscl import info_nce
from conftest import random_sequences as any_sequences
from train.data import Batch
from train.step import training_loss

NUM_ITEMS, NUM_CATEGORIES, TEXT_DIM, IMAGE_DIM = 30, 6, 10, 8
SMALL = dict(hidden_size=16, max_seq_len=8, num_heads=2, ffn_inner_size=32, num_experts=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Catalogue:
    """Item tables the trainer would own: ID rows, frozen features, category labels (item 0 = padding)."""

    def __init__(self, d, num_items=NUM_ITEMS):
        self.id_table = torch.empty(num_items + 1, d)
        init_id_table_(self.id_table)
        self.text = torch.randn(num_items + 1, TEXT_DIM)
        self.image = torch.randn(num_items + 1, IMAGE_DIM)
        self.labels = (torch.rand(num_items + 1, NUM_CATEGORIES) < 0.3).float()
        self.has_label = torch.rand(num_items + 1) < 0.8

    def inputs(self, item_seq, seq_len, id_table=None):
        table = self.id_table if id_table is None else id_table
        return dict(item_seq=item_seq, seq_len=seq_len, id_emb=table[item_seq], text_feat=self.text[item_seq],
                    image_feat=self.image[item_seq], cat_labels=self.labels[item_seq],
                    has_cat=self.has_label[item_seq])

    def candidates(self, model, id_table=None):
        return model.item_candidates(self.id_table if id_table is None else id_table, self.text, self.image)


random_sequences = partial(any_sequences, num_items=NUM_ITEMS)


def make(**overrides):
    cfg = ModelConfig(**{**SMALL, **overrides})
    return build_model(cfg, NUM_CATEGORIES, TEXT_DIM, IMAGE_DIM), Catalogue(cfg.hidden_size)


# ---------------------------------------------------------------- Eq. 11 fusion and Eq. 15 user vectors

def test_encoders_read_e_plus_weight_times_expert_output():
    model, catalogue = make(hidden_dropout=0.0, attn_dropout=0.0)
    model.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    seen = {}
    hooks = [encoder.register_forward_pre_hook(lambda mod, args, m=m: seen.__setitem__(m, args[0]))
             for m, encoder in enumerate(model.encoders)]
    output = model(**inputs)
    for hook in hooks:
        hook.remove()
    valid = item_seq != 0
    x = torch.stack([inputs["id_emb"], model.items.projections["text"](inputs["text_feat"]),
                     model.items.projections["image"](inputs["image_feat"])], dim=2)
    e = x + model.items.position.weight[:8][:, None]
    e_hat, _ = model.moe(e, valid)
    weights, _ = model.category_guidance(e, valid, inputs["cat_labels"], inputs["has_cat"])
    for m in range(3):
        expected = (e[:, :, m] + weights[..., m, None] * e_hat[:, :, m]) * valid[..., None]
        assert torch.allclose(seen[m], expected, atol=1e-6)
    assert torch.equal(output.modality_weights, weights)
    for b, n in enumerate(seq_len.tolist()):
        last = [model.encoders[m](seen[m], _mask(valid))[b, n - 1] for m in range(3)]
        assert torch.allclose(output.user_vectors[b], torch.stack(last), atol=1e-6)


def _mask(valid):
    length = valid.shape[1]
    return (torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, :])[:, None]


# ---------------------------------------------------------------- causality and padding

def test_all_positions_mode_leaks_nothing_from_later_positions():
    model, catalogue = make(sequence_mode="all_positions", router_causal=True, hidden_dropout=0.0, attn_dropout=0.0)
    model.eval()
    item_seq, seq_len = random_sequences(2, 8, [8, 8])
    before = model(**catalogue.inputs(item_seq, seq_len))
    changed = item_seq.clone()
    changed[:, 5] = changed[:, 5] % NUM_ITEMS + 1
    after = model(**catalogue.inputs(changed, seq_len))
    assert torch.equal(before.user_vectors[:, :5], after.user_vectors[:, :5])
    assert torch.equal(before.expert_weights[:, :5], after.expert_weights[:, :5])
    assert not torch.allclose(before.user_vectors[:, 5:], after.user_vectors[:, 5:])


def test_non_causal_router_would_leak_which_is_why_all_positions_requires_the_causal_one():
    router = AttentiveRouter(1, 8, 3, normalize="none", causal=False)
    init_weights_(router)
    e = torch.randn(1, 6, 1, 8)
    changed = e.clone()
    changed[0, 4] += 1.0
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert not torch.allclose(router(e, valid)[:, :4], router(changed, valid)[:, :4])


def test_prefix_mode_reads_the_last_valid_position_of_the_all_positions_encoding():
    prefix, catalogue = make(router_causal=True, hidden_dropout=0.0, attn_dropout=0.0)
    every, _ = make(router_causal=True, sequence_mode="all_positions", hidden_dropout=0.0, attn_dropout=0.0)
    every.load_state_dict(prefix.state_dict())
    prefix.eval(), every.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 4, 1])
    inputs = catalogue.inputs(item_seq, seq_len)
    last = every(**inputs).user_vectors[torch.arange(3), seq_len - 1]
    assert torch.allclose(prefix(**inputs).user_vectors, last, atol=1e-6)


@pytest.mark.parametrize("name", ["cammsr", "sasrec"])
def test_padding_content_never_reaches_the_user_vector(name):
    model, catalogue = make(name=name, hidden_dropout=0.0, attn_dropout=0.0)
    model.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    noisy = {k: v.clone() for k, v in inputs.items()}
    pad = item_seq == 0
    for key in ("id_emb", "text_feat", "image_feat"):
        noisy[key][pad] = torch.randn_like(noisy[key][pad]) * 50
    noisy["cat_labels"][pad] = 1.0
    assert torch.allclose(model(**inputs).user_vectors, model(**noisy).user_vectors, atol=1e-5)


# ---------------------------------------------------------------- losses (Eq. 19-20) and scoring setting

def test_total_loss_is_recommendation_plus_lambda_mscl_plus_optional_category_term():
    model, catalogue = make(mscl_weight=0.5, aux_category_loss_weight=0.3)
    item_seq, seq_len = random_sequences(4, 8)
    output = model(**catalogue.inputs(item_seq, seq_len))
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    terms = model.loss(output, targets, candidates=catalogue.candidates(model))
    assert terms.total.item() == pytest.approx(terms.recommendation.item() + 0.5 * terms.mscl.item()
                                               + 0.3 * terms.category.item(), rel=1e-6)
    expected_mscl = sum(info_nce(a, b) for a, b in output.mscl_views)
    assert len(output.mscl_views) == 3 and terms.mscl.item() == pytest.approx(expected_mscl.item(), rel=1e-6)
    model.eval()
    assert model(**catalogue.inputs(item_seq, seq_len)).mscl_views == []


@pytest.mark.parametrize("negatives", ["global", "local"])
@pytest.mark.parametrize("pair_reduction, share", [("sum", 1.0), ("mean", 1 / 3)])
def test_the_model_and_the_trainer_sum_or_average_the_mscl_pairs_alike(pair_reduction, share, negatives):
    model, catalogue = make(mscl_weight=0.5, mscl_pair_reduction=pair_reduction)
    item_seq, seq_len = random_sequences(4, 8)
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    output = model(**catalogue.inputs(item_seq, seq_len))
    candidates = catalogue.candidates(model)
    terms = model.loss(output, targets, candidates=candidates)
    pair_losses = [info_nce(a, b).item() for a, b in output.mscl_views]
    assert len(pair_losses) == 3 and terms.mscl.item() == pytest.approx(share * sum(pair_losses), rel=1e-6)
    assert terms.total.item() == pytest.approx(terms.recommendation.item() + 0.5 * terms.mscl.item(), rel=1e-6)
    trainer = training_loss(model, output, candidates, Batch(item_seq, seq_len, targets, torch.ones(4, dtype=bool)),
                            negatives)
    assert trainer.mscl.item() == pytest.approx(terms.mscl.item(), rel=1e-6)
    assert trainer.total.item() == pytest.approx(terms.total.item(), rel=1e-6)


@pytest.mark.parametrize("negatives", ["global", "local"])
def test_every_prefix_anchors_contrast_each_valid_position_with_the_other_windows(negatives):
    model, catalogue = make(sequence_mode="all_positions", router_causal=True, mscl_anchors="every_prefix")
    item_seq, seq_len = random_sequences(4, 8, [8, 3, 5, 1])
    targets = torch.cat([item_seq[:, 1:], torch.zeros(4, 1, dtype=torch.long)], dim=1)
    output = model(**catalogue.inputs(item_seq, seq_len))
    valid = item_seq > 0
    rows = torch.arange(4)[:, None].expand(4, 8)[valid]
    assert [tuple(view.shape) for pair in output.mscl_views for view in pair] == [(4, 8, 16)] * 6
    expected = sum(info_nce(a[valid], b[valid], groups=rows) for a, b in output.mscl_views)
    candidates = catalogue.candidates(model)
    terms = model.loss(output, targets, candidates=candidates)
    assert terms.mscl.item() == pytest.approx(expected.item(), rel=1e-6)
    # padding rows of a batch (real False) are no anchors: the trainer's loss on a padded batch is the same
    padded = torch.tensor([True, True, True, False])
    trainer = training_loss(model, output, candidates, Batch(item_seq, seq_len, targets, padded), negatives)
    kept = (valid & padded[:, None])
    without_last_row = sum(info_nce(a[kept], b[kept], groups=torch.arange(4)[:, None].expand(4, 8)[kept])
                           for a, b in output.mscl_views)
    assert trainer.mscl.item() == pytest.approx(without_last_row.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mscl_anchors"):
        ModelConfig(mscl_anchors="every_prefix")


def test_each_encoder_reads_its_swap_views_in_the_main_pass_as_if_each_were_encoded_alone():
    model, catalogue = make(hidden_dropout=0.0, attn_dropout=0.0)
    item_seq, seq_len = random_sequences(4, 8, [8, 3, 5, 1])
    passes = []
    hooks = [encoder.register_forward_hook(lambda module, args, out: passes.append((module, *args, out)))
             for encoder in model.encoders]
    output = model(**catalogue.inputs(item_seq, seq_len))
    for hook in hooks:
        hook.remove()

    assert len(passes) == 3  # one per modality; the three pairs give each encoder two views
    last, valid = seq_len - 1, item_seq != 0
    alone = []
    for encoder, stacked, mask, out in passes:
        assert stacked.shape[0] == 3 * 4
        chunks = [encoder(seq, mask[:4]) for seq in stacked.split(4)]
        torch.testing.assert_close(out, torch.cat(chunks), rtol=1e-5, atol=1e-6)
        alone.append((stacked.split(4), chunks))
    main = torch.stack([chunks[0][torch.arange(4), last] for _, chunks in alone], dim=1)
    torch.testing.assert_close(output.user_vectors, main, rtol=1e-5, atol=1e-6)

    index = {m: i for i, m in enumerate(model.cfg.modalities)}
    used = {i: 1 for i in range(3)}
    for (first, second), (z_i, z_j) in zip(model.cfg.mscl_pairs, output.mscl_views):
        i, j = index[first], index[second]
        (seqs_i, chunks_i), (seqs_j, chunks_j) = alone[i], alone[j]
        view_i, view_j = seqs_i[used[i]], seqs_j[used[j]]
        main_i, main_j = seqs_i[0], seqs_j[0]
        swapped = (view_i != main_i).any(-1)
        assert not swapped[~valid].any() and swapped.any() and not swapped.all()
        torch.testing.assert_close(view_i, torch.where(swapped[..., None], main_j, main_i))
        torch.testing.assert_close(view_j, torch.where(swapped[..., None], main_i, main_j))
        torch.testing.assert_close(z_i, chunks_i[used[i]][torch.arange(4), last], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z_j, chunks_j[used[j]][torch.arange(4), last], rtol=1e-5, atol=1e-6)
        used[i] += 1
        used[j] += 1

    model.eval()
    batch_sizes = []
    for encoder in model.encoders:
        encoder.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    model(**catalogue.inputs(item_seq, seq_len))
    assert batch_sizes == [4, 4, 4]  # evaluation has no views


def test_literal_position_in_candidates_adds_one_constant_per_user_and_keeps_ranks():
    model, catalogue = make(score_with_position=True, hidden_dropout=0.0, attn_dropout=0.0)
    model.eval()
    item_seq, seq_len = random_sequences(4, 8, [8, 3, 5, 1])
    output = model(**catalogue.inputs(item_seq, seq_len))
    positions = model.items.position.weight[seq_len.clamp(max=7)]
    expected = sum(output.user_vectors[:, m] @ positions.T for m in range(3)).diagonal()
    assert torch.allclose(output.score_offset, expected, atol=1e-6)
    candidates = catalogue.candidates(model)
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    with_offset = model.rank_targets(output, candidates, targets)
    output.score_offset = None
    without = model.rank_targets(output, candidates, targets)
    assert torch.equal(with_offset.rank, without.rank) and torch.equal(with_offset.ties, without.ties)


def test_sampled_softmax_loss_runs_through_the_model():
    model, catalogue = make(loss_type="sampled_softmax")
    item_seq, seq_len = random_sequences(4, 8)
    output = model(**catalogue.inputs(item_seq, seq_len))
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    negatives = torch.randint(1, NUM_ITEMS + 1, (7,))
    candidates = catalogue.candidates(model)
    sampled = SampledCandidates(candidates[targets], candidates[negatives], negatives,
                                torch.full((7,), math.log(1 / NUM_ITEMS)))
    terms = model.loss(output, targets, sampled=sampled)
    assert torch.isfinite(terms.total)
    with pytest.raises(ValueError, match="sampled"):
        model.loss(output, targets, candidates=candidates)


def test_id_only_scoring_keeps_the_id_pathway_and_silences_content_and_mscl():
    model, catalogue = make(hidden_dropout=0.0, attn_dropout=0.0)
    item_seq, seq_len = random_sequences(4, 8, [8, 3, 5, 1])
    inputs = catalogue.inputs(item_seq, seq_len)
    model.eval()
    full = model(**inputs).user_vectors
    model.set_id_only(True)
    alone = model(**inputs).user_vectors
    torch.testing.assert_close(alone[:, 0], full[:, 0])
    assert alone[:, 1:].abs().sum() == 0 and full[:, 1:].abs().sum() > 0
    model.train()
    assert model(**inputs).mscl_views == []
    model.set_id_only(False)
    assert len(model(**inputs).mscl_views) == 3
    without_id, _ = make(modalities=("text", "image"), mscl_pairs=(("text", "image"),))
    with pytest.raises(ValueError, match="'id' modality"):
        without_id.set_id_only(True)


# ---------------------------------------------------------------- gradients

GRADIENT_CASES = {
    "paper default": {},
    **{name: overrides for name, overrides in ABLATIONS.items()},
    "literal router (G as written), DyT everywhere, affine": dict(router_normalize="none", dyt_in_blocks=True,
                                                                   dyt_affine=True),
    "all positions, bidirectional MSCL": dict(sequence_mode="all_positions", router_causal=True,
                                              mscl_bidirectional=True, category_weight_sign="negative"),
    "all positions, every prefix an MSCL anchor": dict(sequence_mode="all_positions", router_causal=True,
                                                       mscl_anchors="every_prefix"),
    "sasrec": dict(name="sasrec"),
}


@pytest.mark.parametrize("overrides", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_gradients_reach_every_parameter(overrides):
    model, catalogue = make(**overrides)
    id_table = catalogue.id_table.clone().requires_grad_(True)
    item_seq, seq_len = random_sequences(6, 8)
    output = model(**catalogue.inputs(item_seq, seq_len, id_table))
    if model.cfg.sequence_mode == "prefix":
        targets = torch.randint(1, NUM_ITEMS + 1, (6,))
    else:
        targets = torch.cat([item_seq[:, 1:], torch.zeros(6, 1, dtype=torch.long)], dim=1)
    model.loss(output, targets, candidates=catalogue.candidates(model, id_table)).total.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert id_table.grad[1:].abs().sum() > 0 and id_table.grad[0].abs().sum() == 0


def test_detached_difference_trains_classifiers_only_through_the_auxiliary_loss():
    for weight, expect_gradient in ((0.0, False), (1.0, True)):
        model, catalogue = make(detach_category_difference=True, aux_category_loss_weight=weight)
        item_seq, seq_len = random_sequences(4, 8)
        output = model(**catalogue.inputs(item_seq, seq_len))
        model.loss(output, torch.randint(1, NUM_ITEMS + 1, (4,)), catalogue.candidates(model)).total.backward()
        grad = model.category_guidance.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == expect_gradient


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("name", ["cammsr", "sasrec"])
def test_fp32_and_bf16_autocast_both_train(name):
    model, catalogue = make(name=name, hidden_dropout=0.0, attn_dropout=0.0)
    item_seq, seq_len = random_sequences(4, 8)
    targets = torch.randint(1, NUM_ITEMS + 1, (4,))
    losses = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = model(**catalogue.inputs(item_seq, seq_len))
            terms = model.loss(output, targets, candidates=catalogue.candidates(model))
        terms.total.backward()
        assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        if name == "cammsr":
            assert output.modality_weights.dtype == torch.float32
        losses.append(terms.recommendation.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.1)


# ---------------------------------------------------------------- learning

@pytest.mark.parametrize("name", ["cammsr", "sasrec"])
def test_tiny_model_overfits_a_tiny_dataset(name):
    model, catalogue = make(name=name, hidden_dropout=0.0, attn_dropout=0.0, num_layers=1, mscl_weight=0.1)
    id_table = torch.nn.Parameter(catalogue.id_table.clone())
    item_seq, seq_len = random_sequences(8, 6, [6, 5, 4, 3, 6, 2, 5, 4], num_items=NUM_ITEMS)
    targets = torch.randint(1, NUM_ITEMS + 1, (8,))
    optimizer = torch.optim.Adam([*model.parameters(), id_table], lr=5e-3)
    for _ in range(150):
        optimizer.zero_grad()
        output = model(**catalogue.inputs(item_seq, seq_len, id_table))
        terms = model.loss(output, targets, candidates=catalogue.candidates(model, id_table))
        terms.total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(**catalogue.inputs(item_seq, seq_len, id_table))
        candidates = catalogue.candidates(model, id_table)
        ranks = model.rank_targets(output, candidates, targets)
        final = model.loss(output, targets, candidates=candidates).recommendation.item()
    assert ranks.rank.tolist() == [1] * 8 and ranks.ties.tolist() == [1] * 8
    assert final < 0.1 * math.log(NUM_ITEMS)


# ---------------------------------------------------------------- SASRec semantics

def test_sasrec_matches_a_direct_recbole_style_computation():
    model, catalogue = make(name="sasrec", num_layers=1, hidden_dropout=0.0, attn_dropout=0.0)
    model.eval()
    item_seq, seq_len = random_sequences(2, 8, [8, 3])
    output = model(**catalogue.inputs(item_seq, seq_len))
    block = model.encoder.blocks[0]
    d, heads = 16, 2
    for b, n in enumerate(seq_len.tolist()):
        x = catalogue.id_table[item_seq[b, :n]] + model.position.weight[:n]
        x = F.layer_norm(x, (d,), model.encoder.input_norm.weight, model.encoder.input_norm.bias, 1e-12)
        q, k, v = (x @ block.attention.qkv.weight.T + block.attention.qkv.bias).split(d, dim=-1)
        outputs = []
        for h in range(heads):
            part = slice(h * d // heads, (h + 1) * d // heads)
            scores = q[:, part] @ k[:, part].T / math.sqrt(d // heads)
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            outputs.append(scores.softmax(-1) @ v[:, part])
        attended = torch.cat(outputs, -1) @ block.attention.out.weight.T + block.attention.out.bias
        x = block.attention_norm(x + attended)
        x = block.ffn_norm(x + block.ffn(x))
        assert torch.allclose(output.user_vectors[b, 0], x[-1], atol=1e-5)
    candidates = catalogue.candidates(model)
    assert torch.equal(candidates[:, 0], catalogue.id_table)
    assert isinstance(model.encoder.blocks[0].ffn[1], torch.nn.GELU)


# ---------------------------------------------------------------- construction and profiling

def test_build_model_rejects_missing_inputs():
    with pytest.raises(ValueError, match="text_dim"):
        build_model(ModelConfig(**SMALL), NUM_CATEGORIES, 0, IMAGE_DIM)
    with pytest.raises(ValueError, match="num_categories"):
        build_model(ModelConfig(**SMALL), 0, TEXT_DIM, IMAGE_DIM)
    model = build_model(ModelConfig(**SMALL, use_category_guidance=False), 0, TEXT_DIM, IMAGE_DIM)
    assert model.category_guidance is None


def test_parameter_count_and_flops_per_sample():
    model, _ = make(name="sasrec", hidden_dropout=0.0, attn_dropout=0.0)
    counts = parameter_counts(model)
    d, inner, length, layers = 16, 32, 8, 2
    per_layer = 4 * d * d + 4 * d + 2 * d * inner + inner + d + 4 * d
    assert counts["total"] == counts["trainable"] == length * d + 2 * d + layers * per_layer
    flops = flops_per_sample(model, num_items=NUM_ITEMS, batch_size=2)
    linear = 2 * length * (3 * d * d + d * d + 2 * d * inner)
    attention = 2 * 2 * length * length * d
    assert flops["forward"] == layers * (linear + attention)
    assert flops["scoring"] == 2 * NUM_ITEMS * d
    assert flops["train_step"] > 2 * flops["forward"]
    cammsr, _ = make()
    cammsr_flops = flops_per_sample(cammsr, NUM_ITEMS, NUM_CATEGORIES, TEXT_DIM, IMAGE_DIM, batch_size=2)
    assert cammsr_flops["forward"] > 3 * flops["forward"] and cammsr_flops["candidate_projection"] > 0


# ---------------------------------------------------------------- frozen-feature normalisation before Eq. 4

def test_standardized_features_are_centred_unit_norm_rows_saved_with_the_model():
    model, catalogue = make()
    offset = torch.linspace(5.0, 40.0, IMAGE_DIM)  # a large shared direction, as encoder outputs have
    catalogue.image = catalogue.image * 3.0 + offset
    catalogue.image[[0, 4]] = 0.0  # padding and an item without an image
    model.fit_feature_statistics(catalogue.text, catalogue.image)
    present = catalogue.image.abs().sum(dim=1) > 0
    items = model.items
    normalised = (catalogue.image[present] - items.image_mean) * items.image_inv_std
    torch.testing.assert_close(normalised.mean(dim=0), torch.zeros(IMAGE_DIM), atol=1e-5, rtol=0)
    assert normalised.norm(dim=1).pow(2).mean().item() == pytest.approx(1.0, rel=0.1)
    projected = model.item_candidates(catalogue.id_table, catalogue.text, catalogue.image)[:, 2]
    torch.testing.assert_close(projected, items.projections["image"](
        (catalogue.image - items.image_mean) * items.image_inv_std))
    restored, _ = make()
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.items.image_inv_std, items.image_inv_std)


def test_literal_feature_reading_projects_raw_features():
    model, catalogue = make(feature_normalization="none")
    model.fit_feature_statistics(catalogue.text, catalogue.image)
    torch.testing.assert_close(model.item_candidates(catalogue.id_table, catalogue.text, catalogue.image)[:, 1],
                               model.items.projections["text"](catalogue.text))
    assert not any("mean" in name for name, _ in model.named_buffers())
