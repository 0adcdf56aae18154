"""TAME (cammsr/tame.py): each equation against a computation written out here, causality, padding, the ID
contrastive batch term, chunked candidates, the ablation switches, losses and gradients."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from cammsr import ModelConfig, SampledCandidates, build_model, flops_per_sample, init_id_table_
from cammsr.tame import GatedAggregation, IdEnrichment, ModalityRetriever, TokenStandardizer
from conftest import random_sequences as any_sequences
from train.data import Batch
from train.step import training_loss

NUM_ITEMS, TEXT_DIM, IMAGE_DIM, TEXT_TOKENS, IMAGE_PATCHES = 30, 12, 8, 6, 5
NO_IMAGE = 4  # an item whose image is missing: all its patches are zero
SMALL = dict(name="tame", hidden_size=16, max_seq_len=8, num_heads=2, ffn_inner_size=32, tame_text_queries=2,
             tame_image_queries=3, tame_text_heads=2, tame_image_heads=4)
EXACT = dict(hidden_dropout=0.0, attn_dropout=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def token_table(num_items, tokens, dim):
    """[N + 1, T, F]: each item has its [CLS] and a random number of further tokens, zero tokens after them."""
    table = torch.randn(num_items + 1, tokens, dim)
    lengths = torch.randint(1, tokens + 1, (num_items + 1,))
    table[torch.arange(tokens)[None, :] >= lengths[:, None]] = 0.0
    table[0] = 0.0
    return table


class Catalogue:
    """The item tables the trainer would own: ID rows and token-level frozen features (item 0 = padding)."""

    def __init__(self, d):
        self.id_table = torch.empty(NUM_ITEMS + 1, d)
        init_id_table_(self.id_table)
        self.text = token_table(NUM_ITEMS, TEXT_TOKENS, TEXT_DIM)
        self.image = token_table(NUM_ITEMS, IMAGE_PATCHES, IMAGE_DIM)
        self.image[NO_IMAGE] = 0.0

    def inputs(self, item_seq, seq_len, id_table=None):
        table = self.id_table if id_table is None else id_table
        return dict(item_seq=item_seq, seq_len=seq_len, id_emb=table[item_seq], text_feat=self.text[item_seq],
                    image_feat=self.image[item_seq])

    def candidates(self, model, id_table=None):
        return model.item_candidates(self.id_table if id_table is None else id_table, self.text, self.image)


random_sequences = partial(any_sequences, num_items=NUM_ITEMS)


def make(**overrides):
    """A small TAME with non-zero biases (initialised at zero they would hide what a bias path does)."""
    cfg = ModelConfig(**{**SMALL, **overrides})
    model = build_model(cfg, 0, TEXT_DIM, IMAGE_DIM)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model, Catalogue(cfg.hidden_size)


def next_item_targets(item_seq):
    return torch.cat([item_seq[:, 1:], torch.zeros(item_seq.shape[0], 1, dtype=torch.long)], dim=1)


# ---------------------------------------------------------------- Eq. 7-8 and Eq. 10-12 with fixed weights

@pytest.mark.parametrize("softmax", [False, True])
def test_gated_aggregation_is_eq_7_8(softmax):
    aggregation = GatedAggregation(hidden=2, num_queries=2, softmax=softmax)
    with torch.no_grad():
        aggregation.gate.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        aggregation.gate.bias.copy_(torch.tensor([0.5, -1.0]))
    retrieved = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # g = Concat(1, 2, 3, 4) W_g + b_g = (1 + 0.5, 4 - 1)
    if softmax:
        first = 1 / (1 + math.exp(1.5))
        expected = torch.tensor([first * 1 + (1 - first) * 3, first * 2 + (1 - first) * 4])
    else:
        expected = torch.tensor([1.5 * 1 + 3.0 * 3, 1.5 * 2 + 3.0 * 4])
    torch.testing.assert_close(aggregation(retrieved), expected)


def test_id_enrichment_is_eq_10_12():
    enrichment = IdEnrichment(hidden=2, num_experts=2)
    with torch.no_grad():
        enrichment.gate.weight.zero_()
        enrichment.gate.weight[1, 2] = 1.0  # expert 2's logit reads z[2]: the first entry of the second vector
        enrichment.gate.bias.zero_()
        enrichment.experts.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    retrieved = torch.tensor([[0.0, 5.0], [math.log(3.0), 7.0]])  # logits (0, ln 3): g = (1/4, 3/4)
    x = torch.tensor([2.0, 4.0])
    # 1/4 * (1 * 2, 2 * 4) + 3/4 * (3 * 2, -1 * 4)
    torch.testing.assert_close(enrichment(x, retrieved), torch.tensor([5.0, -1.0]))


# ---------------------------------------------------------------- Eq. 3-6: the ID-aware retriever

def attention_by_hand(attention, queries, keys, heads):
    """One item's multi-head attention, each head written out: queries [q, D_q], keys [k, D_k]."""
    width = attention.query.out_features
    size = width // heads
    q = queries @ attention.query.weight.T + attention.query.bias
    key_value = keys @ attention.key_value.weight.T + attention.key_value.bias
    k, v = key_value[:, :width], key_value[:, width:]
    heads_out = []
    for head in range(heads):
        part = slice(head * size, (head + 1) * size)
        scores = q[:, part] @ k[:, part].T / math.sqrt(size)
        heads_out.append(scores.softmax(dim=-1) @ v[:, part])
    return torch.cat(heads_out, dim=-1) @ attention.out.weight.T + attention.out.bias


@pytest.mark.parametrize("width", ["hidden", "feature"])
def test_retriever_is_eq_3_to_6_over_the_non_padding_tokens(width):
    model, catalogue = make(modalities=("id", "text"), feature_normalization="none",
                            tame_cross_attention_width=width, **EXACT)
    model.eval()
    retriever = model.retrievers["text"]
    assert retriever.cross_attention.query.out_features == (16 if width == "hidden" else TEXT_DIM)
    ids = torch.randn(2, 16)
    tokens = torch.randn(2, TEXT_TOKENS, TEXT_DIM)
    tokens[0, 3:] = 0.0  # the first item has [CLS] and two tokens
    retrieved = model.retrieve(ids, {"text": tokens})["text"]
    for item, length in enumerate((3, TEXT_TOKENS)):
        queries = retriever.queries
        id_aware = attention_by_hand(retriever.self_attention, queries, torch.cat([queries, ids[item, None]]), 2)
        intermediate = attention_by_hand(retriever.cross_attention, id_aware, tokens[item, :length], 2)
        expected = retriever.norm(intermediate + retriever.ffn(intermediate))
        torch.testing.assert_close(retrieved[item], expected, rtol=1e-5, atol=1e-5)
    padded = torch.cat([tokens, torch.zeros(2, 4, TEXT_DIM)], dim=1)  # more padding tokens change nothing
    torch.testing.assert_close(model.retrieve(ids, {"text": padded})["text"], retrieved, rtol=1e-5, atol=1e-6)


def test_an_item_without_tokens_retrieves_zero_and_stays_finite():
    model, catalogue = make(**EXACT)
    id_table = catalogue.id_table.clone().requires_grad_(True)
    retrieved = model.retrieve(id_table[[0, NO_IMAGE]], {"text": catalogue.text[[0, NO_IMAGE]],
                                                        "image": catalogue.image[[0, NO_IMAGE]]})
    assert retrieved["image"].abs().sum() == 0 and retrieved["text"][0].abs().sum() == 0
    assert retrieved["text"][1].abs().sum() > 0
    candidates = catalogue.candidates(model, id_table)
    assert candidates[0].abs().sum() == 0 and candidates[NO_IMAGE, 2].abs().sum() == 0
    item_seq = torch.tensor([[NO_IMAGE, 3, NO_IMAGE, 0, 0, 0, 0, 0]])
    output = model(**catalogue.inputs(item_seq, torch.tensor([3]), id_table))
    loss = model.loss(output, torch.tensor([5]), candidates=candidates).total
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(id_table.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- Eq. 9-14 assembled

def test_encoders_read_enriched_ids_and_aggregated_content_plus_positions():
    model, catalogue = make(**EXACT)
    model.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    seen = {}
    hooks = [encoder.register_forward_pre_hook(lambda module, args, m=m: seen.__setitem__(m, args[0]))
             for m, encoder in enumerate(model.encoders)]
    output = model(**inputs)
    for hook in hooks:
        hook.remove()
    valid = (item_seq != 0)[..., None]
    flat = item_seq.reshape(-1)
    retrieved = model.retrieve(catalogue.id_table[flat], {"text": catalogue.text[flat],
                                                          "image": catalogue.image[flat]})
    retrieved = {m: vectors.unflatten(0, item_seq.shape) for m, vectors in retrieved.items()}
    positions = model.position.weight[:8]
    x_id = inputs["id_emb"] + positions
    all_retrieved = torch.cat([retrieved["text"], retrieved["image"]], dim=-2)
    torch.testing.assert_close(seen[0], model.enrichment(x_id, all_retrieved) * valid)
    for m, modality in ((1, "text"), (2, "image")):
        torch.testing.assert_close(seen[m], (model.aggregations[modality](retrieved[modality]) + positions) * valid)
    for b, n in enumerate(seq_len.tolist()):
        mask = (torch.ones(8, 8, dtype=torch.bool).tril() & (item_seq[b] != 0)[None, :])[None, None]
        last = [model.encoders[m](seen[m][b:b + 1], mask)[0, n - 1] for m in range(3)]
        torch.testing.assert_close(output.user_vectors[b], torch.stack(last))


def test_without_id_enrichment_the_id_encoder_reads_e_id_plus_position():
    model, catalogue = make(tame_use_id_enrichment=False, **EXACT)
    assert model.enrichment is None
    model.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    seen = []
    model.encoders[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(**inputs)
    expected = (inputs["id_emb"] + model.position.weight[:8]) * (item_seq != 0)[..., None]
    torch.testing.assert_close(seen[0], expected)


def test_the_id_enrichment_routing_is_the_outputs_expert_weights():
    model, catalogue = make(**EXACT)
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    output = model(**inputs)
    valid = item_seq != 0
    retrieved = model.retrieve(inputs["id_emb"][valid], {"text": inputs["text_feat"][valid],
                                                         "image": inputs["image_feat"][valid]})
    routing = model.enrichment.routing(torch.cat([retrieved["text"], retrieved["image"]], dim=-2))
    assert output.expert_groups == ("id_enrichment",) and output.expert_weights.shape == (3, 8, 1, 2 + 3)
    torch.testing.assert_close(output.expert_weights[valid][:, 0], routing)
    assert output.expert_weights[~valid].abs().sum() == 0
    torch.testing.assert_close(output.expert_usage()[0], routing.mean(0))
    ablated, _ = make(tame_use_id_enrichment=False, **EXACT)
    assert ablated(**inputs).expert_weights is None


def test_without_retriever_only_the_cls_token_is_read():
    ablated, catalogue = make(tame_use_retriever=False, **EXACT)
    full, _ = make(**EXACT)
    assert not any(isinstance(module, ModalityRetriever) for module in ablated.modules())
    assert not any("queries" in name for name, _ in ablated.named_parameters())
    ablated.eval(), full.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    changed = dict(inputs, text_feat=inputs["text_feat"].clone(), image_feat=inputs["image_feat"].clone())
    changed["text_feat"][:, :, 1:] *= 3.0  # every token but the [CLS]
    changed["image_feat"][:, :, 1:] *= 3.0
    torch.testing.assert_close(ablated(**changed).user_vectors, ablated(**inputs).user_vectors)
    assert not torch.allclose(full(**changed).user_vectors, full(**inputs).user_vectors)
    changed["text_feat"][:, :, 0] *= 3.0
    assert not torch.allclose(ablated(**changed).user_vectors, ablated(**inputs).user_vectors)


def test_chunks_are_taken_by_token_count_and_cut_after_their_longest_item(monkeypatch):
    model, catalogue = make(tame_item_chunk_size=4, **EXACT)
    model.eval()
    extents = {m: (table.any(-1) * torch.arange(1, table.shape[1] + 1)).amax(-1)
               for m, table in (("text", catalogue.text), ("image", catalogue.image))}
    seen, plain_retrieve = [], model.retrieve

    def recording_retrieve(id_rows, tokens, masks=None):
        seen.append({m: (rows.shape[1], masks[m].shape[1]) for m, rows in tokens.items()})
        return plain_retrieve(id_rows, tokens, masks)

    monkeypatch.setattr(model, "retrieve", recording_retrieve)
    chunked = catalogue.candidates(model)
    monkeypatch.undo()
    order = (extents["text"] + extents["image"]).argsort()
    assert len(seen) == math.ceil((NUM_ITEMS + 1) / 4)
    for chunk, widths in enumerate(seen):
        index = order[chunk * 4: (chunk + 1) * 4]
        for modality in ("text", "image"):
            assert widths[modality] == (max(int(extents[modality][index].max()), 1),) * 2
    assert seen[0]["text"][0] < TEXT_TOKENS  # the shortest items' chunk drops padding
    torch.testing.assert_close(chunked, torch.stack([
        catalogue.id_table, *(model.aggregations[m](r) for m, r in model.retrieve(
            catalogue.id_table, {"text": catalogue.text, "image": catalogue.image}).items())], dim=-2))


def test_the_catalogues_masks_and_order_are_kept_while_its_tables_stay_the_same(monkeypatch):
    import cammsr.tame
    model, catalogue = make(tame_item_chunk_size=4, **EXACT)
    uncached, _ = make(tame_item_chunk_size=4, **EXACT)
    uncached.load_state_dict(model.state_dict())
    model.eval(), uncached.eval()
    masked, given, plain_retrieve = [], [], model.retrieve
    monkeypatch.setattr(cammsr.tame, "token_mask", lambda rows: masked.append(rows.shape) or rows.any(-1))
    monkeypatch.setattr(model, "retrieve", lambda ids, rows, masks=None: given.append(rows) or plain_retrieve(
        ids, rows, masks))
    first = catalogue.candidates(model)
    torch.testing.assert_close(catalogue.candidates(model), first)
    assert len(masked) == 2  # text and image, once: the second call reused them
    half = len(given) // 2  # ... and the chunks' token rows, not copied out of the tables again
    assert all(a[m] is b[m] for a, b in zip(given[:half], given[half:]) for m in ("text", "image"))
    catalogue.text[5] = 0.0  # changed in place: computed again, and item 5 now retrieves no text
    changed = catalogue.candidates(model)
    assert len(masked) == 4 and changed[5, 1].abs().sum() == 0
    torch.testing.assert_close(changed, catalogue.candidates(uncached))
    catalogue.image = catalogue.image.clone()  # another table: computed again
    catalogue.candidates(model)
    assert len(masked) == 8
    text = catalogue.text.clone().requires_grad_()  # a table being trained is never kept
    model.retrieve_by_length(catalogue.id_table, {"text": text, "image": catalogue.image}, catalogue=True)
    model.retrieve_by_length(catalogue.id_table, {"text": text, "image": catalogue.image}, catalogue=True)
    assert len(masked) == 12


def test_standardisation_folded_into_the_keys_equals_retrieving_standardised_tokens():
    model, catalogue = make(feature_normalization="standardize", **EXACT)
    model.fit_feature_statistics(catalogue.text, catalogue.image)
    assert model.standardizers["text"].mean.abs().sum() > 0
    raw, _ = make(feature_normalization="none", **EXACT)
    raw.load_state_dict(model.state_dict(), strict=False)
    tables = {"text": catalogue.text, "image": catalogue.image}
    ids = catalogue.id_table.clone().requires_grad_(True)
    folded = model.retrieve(ids, tables)
    masks = {m: table.any(-1) for m, table in tables.items()}
    standardized = {m: model.standardizers[m](table) for m, table in tables.items()}
    ids_raw = catalogue.id_table.clone().requires_grad_(True)
    explicit = raw.retrieve(ids_raw, standardized, masks)
    for modality in tables:
        torch.testing.assert_close(folded[modality], explicit[modality], rtol=1e-5, atol=1e-5)
    sum(v.sum() for v in folded.values()).backward()
    sum(v.sum() for v in explicit.values()).backward()
    torch.testing.assert_close(ids.grad, ids_raw.grad, rtol=1e-4, atol=1e-5)
    key_value = "retrievers.text.cross_attention.key_value.weight"
    torch.testing.assert_close(dict(model.named_parameters())[key_value].grad,
                               dict(raw.named_parameters())[key_value].grad, rtol=1e-4, atol=1e-5)


def test_candidates_are_eq_14_items_and_chunks_equal_one_pass():
    model, catalogue = make(tame_item_chunk_size=7, **EXACT)
    whole, _ = make(tame_item_chunk_size=1000, **EXACT)
    whole.load_state_dict(model.state_dict())
    model.eval(), whole.eval()
    chunked = catalogue.candidates(model)
    torch.testing.assert_close(chunked, catalogue.candidates(whole))
    assert chunked.shape == (NUM_ITEMS + 1, 3, 16)
    torch.testing.assert_close(chunked[:, 0], catalogue.id_table)
    retrieved = whole.retrieve(catalogue.id_table, {"text": catalogue.text, "image": catalogue.image})
    torch.testing.assert_close(chunked[:, 1], whole.aggregations["text"](retrieved["text"]))
    torch.testing.assert_close(chunked[:, 2], whole.aggregations["image"](retrieved["image"]))

    enriched, _ = make(tame_candidate_id="enriched", **EXACT)
    enriched.load_state_dict(model.state_dict())
    enriched.eval()
    expected = enriched.enrichment(catalogue.id_table, torch.cat([retrieved["text"], retrieved["image"]], dim=-2))
    torch.testing.assert_close(catalogue.candidates(enriched)[:, 0], expected)


def test_candidates_of_most_items_read_from_the_catalogue_equal_their_gathered_rows_with_the_same_gradients():
    """Ids covering most of the catalogue are read out of the whole catalogue's retrieval: the same vectors and the
    same gradients for the ID rows and every parameter as retrieving their gathered rows."""
    from cammsr.base import SequentialRecommender
    model, catalogue = make(tame_item_chunk_size=4, tame_candidate_id="enriched", **EXACT)
    model.eval()
    count = NUM_ITEMS - 3
    ids = torch.randperm(NUM_ITEMS)[:count] + 1
    results = []
    for read in (model.candidates_of, partial(SequentialRecommender.candidates_of, model)):
        model.zero_grad()
        id_rows = catalogue.id_table[ids].clone().requires_grad_()
        vectors = read(ids, id_rows, catalogue.text, catalogue.image)
        (vectors * torch.linspace(-1, 1, vectors.numel()).view_as(vectors)).sum().backward()
        results.append((vectors.detach(), id_rows.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}))
        if len(results) == 1:  # the catalogue's own tables were laid out, not a gathered copy
            assert model._kept_layout[0]["text"]() is catalogue.text
    (fast, fast_id_grad, fast_grads), (gathered, gathered_id_grad, gathered_grads) = results
    assert fast.shape == (count, 3, 16)
    torch.testing.assert_close(fast, gathered)
    torch.testing.assert_close(fast_id_grad, gathered_id_grad)
    assert fast_grads.keys() == gathered_grads.keys() and "retrievers.text.queries" in fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], gathered_grads[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- causality and padding

def test_all_positions_mode_leaks_nothing_from_later_positions():
    model, catalogue = make(sequence_mode="all_positions", **EXACT)
    model.eval()
    item_seq, seq_len = random_sequences(2, 8, [8, 8])
    before = model(**catalogue.inputs(item_seq, seq_len))
    changed = item_seq.clone()
    changed[:, 5] = changed[:, 5] % NUM_ITEMS + 1
    after = model(**catalogue.inputs(changed, seq_len))
    assert before.user_vectors.shape == (2, 8, 3, 16)
    torch.testing.assert_close(before.user_vectors[:, :5], after.user_vectors[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before.user_vectors[:, 5:], after.user_vectors[:, 5:])


def test_prefix_mode_reads_the_last_valid_position_of_the_all_positions_encoding():
    prefix, catalogue = make(**EXACT)
    every, _ = make(sequence_mode="all_positions", **EXACT)
    every.load_state_dict(prefix.state_dict())
    prefix.eval(), every.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 4, 1])
    inputs = catalogue.inputs(item_seq, seq_len)
    last = every(**inputs).user_vectors[torch.arange(3), seq_len - 1]
    torch.testing.assert_close(prefix(**inputs).user_vectors, last)


@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_padding_content_never_reaches_a_valid_position(mode):
    model, catalogue = make(sequence_mode=mode, **EXACT)
    model.eval()
    item_seq, seq_len = random_sequences(3, 8, [8, 5, 2])
    inputs = catalogue.inputs(item_seq, seq_len)
    noisy = {key: value.clone() for key, value in inputs.items()}
    pad = item_seq == 0
    for key in ("id_emb", "text_feat", "image_feat"):
        noisy[key][pad] = torch.randn_like(noisy[key][pad]) * 50
    before, after = model(**inputs), model(**noisy)
    keep = slice(None) if mode == "prefix" else ~pad
    torch.testing.assert_close(before.user_vectors[keep], after.user_vectors[keep], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- Eq. 16-17: the ID contrastive batch term

def eq_16_by_hand(r, e, anchors, tau):
    """Mean over anchors (row, position) of -log exp(cos(r_a, e_a)/tau) / sum_j exp(cos(r_a, e_j)/tau), j over the
    anchors of the other rows and a itself; e_a: the anchor's target's ID candidate."""
    losses = []
    for row, position in anchors:
        allowed = [(b, l) for b, l in anchors if b != row or l == position]
        logits = torch.stack([F.cosine_similarity(r[row, position], e[b, l], dim=0) / tau for b, l in allowed])
        losses.append(-(logits.log_softmax(0)[allowed.index((row, position))]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("mode", ["prefix", "all_positions"])
def test_contrastive_term_is_eq_16_on_the_targets(mode):
    cl = dict(tame_cl_weight=0.3, tame_cl_temperature=0.5, **EXACT)
    model, catalogue = make(sequence_mode=mode, **cl)
    item_seq, seq_len = random_sequences(4, 8, [8, 3, 5, 1])
    inputs = catalogue.inputs(item_seq, seq_len)
    output = model(**inputs)
    assert [(c.name, c.modality, c.weight, c.temperature) for c in output.target_contrasts] == [("cl", 0, 0.3, 0.5)]
    candidates = catalogue.candidates(model)
    if mode == "prefix":
        targets = torch.randint(1, NUM_ITEMS + 1, (4,))
        r = output.user_vectors[:, None, 0]
        e = candidates[targets][:, None, 0]
        anchors = [(b, 0) for b in range(4)]
    else:
        targets = next_item_targets(item_seq)
        r, e = output.user_vectors[:, :, 0], candidates[targets][:, :, 0]
        anchors = [(b, l) for b in range(4) for l in range(targets.shape[1]) if targets[b, l] > 0]
    expected = 0.3 * eq_16_by_hand(r, e, anchors, 0.5)
    torch.testing.assert_close(model.loss(output, targets, candidates=candidates).auxiliary, expected)
    real = torch.ones(4, dtype=torch.bool)
    trainer = training_loss(model, output, candidates, Batch(item_seq, seq_len, targets, real), "global")
    torch.testing.assert_close(trainer.auxiliary, expected)
    # a padding row of the batch (real False) holds no anchor
    padded = torch.tensor([False, True, True, True])
    trainer = training_loss(model, output, candidates, Batch(item_seq, seq_len, targets, padded), "global")
    without_first = [(b, l) for b, l in anchors if b != 0]
    torch.testing.assert_close(trainer.auxiliary, 0.3 * eq_16_by_hand(r, e, without_first, 0.5))

    model.eval()
    assert model(**inputs).target_contrasts == []
    no_cl, _ = make(sequence_mode=mode, tame_cl_weight=0.0)
    assert no_cl(**inputs).target_contrasts == []


def test_contrastive_term_without_scored_targets_is_zero():
    model, catalogue = make(**EXACT)
    item_seq, seq_len = random_sequences(3, 8, [1, 1, 1])
    output = model(**catalogue.inputs(item_seq, seq_len))
    terms = model.loss(output, torch.zeros(3, dtype=torch.long), candidates=catalogue.candidates(model))
    assert terms.auxiliary.item() == 0.0 and torch.isfinite(terms.total)


# ---------------------------------------------------------------- losses and gradients

GRADIENT_CASES = {
    "paper default": {},
    "all positions": dict(sequence_mode="all_positions"),
    "softmax gate, feature-width attention, enriched ID candidates": dict(
        tame_aggregation_gate="softmax", tame_cross_attention_width="feature", tame_candidate_id="enriched"),
    "w/o retriever": dict(tame_use_retriever=False),
    "w/o ID enrichment": dict(tame_use_id_enrichment=False),
    "w/o text": dict(modalities=("id", "image")),
    "w/o vision": dict(modalities=("id", "text")),
    "raw features": dict(feature_normalization="none"),
}


@pytest.mark.parametrize("loss_type", ["full_softmax", "sampled_softmax"])
@pytest.mark.parametrize("overrides", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_gradients_reach_every_parameter_and_the_id_rows(overrides, loss_type):
    model, catalogue = make(loss_type=loss_type, **overrides)
    model.fit_feature_statistics(catalogue.text, catalogue.image)
    id_table = catalogue.id_table.clone().requires_grad_(True)
    item_seq, seq_len = random_sequences(6, 8)
    output = model(**catalogue.inputs(item_seq, seq_len, id_table))
    if model.cfg.sequence_mode == "prefix":
        targets = torch.randint(1, NUM_ITEMS + 1, (6,))
    else:
        targets = next_item_targets(item_seq)
    candidates = catalogue.candidates(model, id_table)
    if loss_type == "full_softmax":
        terms = model.loss(output, targets, candidates=candidates)
    else:
        scored = targets.reshape(-1)[targets.reshape(-1) > 0]
        negatives = torch.randint(1, NUM_ITEMS + 1, (7,))
        sampled = SampledCandidates(candidates[scored], candidates[negatives], negatives,
                                    torch.full((7,), math.log(1 / NUM_ITEMS)))
        terms = model.loss(output, targets, sampled=sampled)
    terms.total.backward()
    assert torch.isfinite(terms.total) and terms.auxiliary > 0
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert id_table.grad[1:].abs().sum() > 0 and id_table.grad[0].abs().sum() == 0
    if model.cfg.tame_use_retriever:
        assert model.retrievers[model.content[0]].queries.grad.abs().sum() > 0


def test_bf16_autocast_trains():
    model, catalogue = make(**EXACT)
    item_seq, seq_len = random_sequences(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**catalogue.inputs(item_seq, seq_len))
        terms = model.loss(output, torch.randint(1, NUM_ITEMS + 1, (4,)), candidates=catalogue.candidates(model))
    terms.total.backward()
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- token statistics and configuration

def test_token_statistics_are_taken_over_non_padding_tokens_a_chunk_at_a_time():
    table = token_table(NUM_ITEMS, IMAGE_PATCHES, IMAGE_DIM) * 3.0
    table[table.ne(0).any(-1)] += torch.linspace(5.0, 40.0, IMAGE_DIM)  # a large shared direction
    tokens = table[table.ne(0).any(-1)]
    standardizer = TokenStandardizer(IMAGE_DIM)
    standardizer.fit(table, chunk_size=4)
    torch.testing.assert_close(standardizer.mean, tokens.mean(0))
    torch.testing.assert_close(standardizer.inv_std, 1 / (tokens.std(0) * math.sqrt(IMAGE_DIM)))
    more_padding = TokenStandardizer(IMAGE_DIM)
    more_padding.fit(torch.cat([table, torch.zeros(NUM_ITEMS + 1, 3, IMAGE_DIM)], dim=1), chunk_size=1000)
    torch.testing.assert_close(more_padding.mean, standardizer.mean)
    torch.testing.assert_close(more_padding.inv_std, standardizer.inv_std)
    assert standardizer(tokens).norm(dim=-1).pow(2).mean().item() == pytest.approx(1.0, rel=0.1)

    model, catalogue = make()
    model.fit_feature_statistics(catalogue.text, table)
    torch.testing.assert_close(model.standardizers["image"].mean, standardizer.mean)
    restored, _ = make()
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.standardizers["image"].inv_std, standardizer.inv_std)
    raw, _ = make(feature_normalization="none")
    assert len(raw.standardizers) == 0


@pytest.mark.parametrize("overrides, field", [
    (dict(modalities=("text", "image")), "modalities"),
    (dict(modalities=("id",)), "modalities"),
    (dict(tame_text_heads=3), "tame_text_heads"),
    (dict(tame_image_queries=0), "tame_image_queries"),
    (dict(tame_cl_temperature=0.0), "tame_cl_temperature"),
    (dict(tame_cl_weight=-1.0), "tame_cl_weight"),
    (dict(tame_candidate_id="enriched", tame_use_id_enrichment=False), "tame_candidate_id"),
    (dict(tame_aggregation_gate="sigmoid"), "tame_aggregation_gate"),
])
def test_config_rejects_what_tame_cannot_run(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **overrides})


def test_feature_width_attention_needs_heads_that_divide_the_features():
    cfg = ModelConfig(**{**SMALL, "tame_cross_attention_width": "feature", "tame_image_heads": 16,
                         "hidden_size": 16})
    with pytest.raises(ValueError, match="feature size 8"):
        build_model(cfg, 0, TEXT_DIM, IMAGE_DIM)
    with pytest.raises(ValueError, match="text_dim=0"):
        build_model(ModelConfig(**SMALL), 0, 0, IMAGE_DIM)


def test_flops_per_sample_counts_the_catalogue_tokens_the_retriever_projects():
    model, _ = make(**EXACT)
    flops = {tokens: flops_per_sample(model, NUM_ITEMS, 0, TEXT_DIM, IMAGE_DIM, batch_size=2, tokens_per_item=tokens)
             for tokens in (4, 8)}
    width = SMALL["hidden_size"]  # tame_cross_attention_width "hidden": keys and values projected to d
    key_value_of_4_tokens = 2 * (NUM_ITEMS + 1) * 4 * (TEXT_DIM + IMAGE_DIM) * 2 * width
    assert flops[8]["candidate_projection"] - flops[4]["candidate_projection"] > key_value_of_4_tokens
    assert flops[8]["forward"] > flops[4]["forward"] > 0
