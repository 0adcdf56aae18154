"""TAME (Section IV of "Enhancing Sequential Recommendation via Task-Aware Query-Based Multi-Modal Retrieval").

Per item, ID-aware learnable queries retrieve from the frozen token / patch features of each modality (Eq. 3-6), a
gate aggregates each modality's retrieved vectors (Eq. 7-8) and the retrieved vectors gate an element-wise MoE over
the ID embedding (Eq. 9-12). One Transformer per modality encodes the sequences (Eq. 13), Eq. 14 scores, and Eq. 16
is an auxiliary contrastive loss on the ID pathway (Eq. 17).

Equation -> code (ambiguity: reading chosen, why)
-------------------------------------------------
Eq. 1     E^t, E^v: forward's text_feat [B, L, T, F_t] / image_feat [B, L, P, F_v], [CLS] first (the paper lists
          ViT's last; the feature path puts it first); an all-zero token is padding. With
          feature_normalization="standardize" each dimension is z-scored over the catalogue's non-padding tokens
          (TokenStandardizer; the reason is item_representation.py's), folded into the keys' projection.
Eq. 3-4   ModalityRetriever.self_attention: the N_q queries attend over H = [Q; e^id] (e^id: the raw ID row, no
          position), h heads of d/h. Only the query rows are computed, since Eq. 4 discards the ID row's output.
          ambiguity: residual / LayerNorm around the attentions (BLIP-2's Q-Former has them): none, as written.
Eq. 5     ModalityRetriever.cross_attention from Q~ over the item's non-padding tokens, h heads, output W^{c,O} -> d.
          ambiguity: head sizes. W^{c,Q} maps d to d_h = d/h, W^{c,K}, W^{c,V} map d^t to d^t/h, which cannot meet
          unless d = d^t. tame_cross_attention_width "hidden" (default): keys and values projected to d (the queries'
          d_h per head); the whole catalogue's tokens pass through this projection at every full-softmax step, and
          768 -> 64 costs 12x less than 768 -> 768. "feature": queries projected to d^t (d^t/h per head, the keys'
          d_h^t), W^{c,O} maps d^t -> d.
Eq. 6     (the FFN sentence after Eq. 5) E^ = LayerNorm(E~ + Dropout(FFN(E~))), FFN d -> ffn_inner_size -> d with GELU.
          ambiguity: FFN size and activation are not given: the encoders' (RecBole's) block FFN.
          An item without any token (padding item 0, a missing image) retrieves nothing: E^ = 0, so its e^ is 0 and
          Eq. 14 adds nothing for that modality.
w/o retriever (tame_use_retriever=False, Table III "replaces the ID-aware modality retriever with an MLP"):
          ClsProjection, MLP([CLS]) -> N_q vectors + LayerNorm, so that Eq. 7-12 run unchanged on vectors of the
          retriever's scale.
Eq. 7-8   GatedAggregation: g = Concat(E^) W_g + b_g, e^ = sum_j g_j E^_j.
          ambiguity: Eq. 8 has no softmax while Eq. 12 has one: tame_aggregation_gate "linear" (as written) or
          "softmax" (default) over the N_q vectors (a convex mixture; with one query it is the identity): the
          literal gate scales a sum of LayerNorm outputs and starts training with saturated logits (measured in
          ModelConfig's comment).
Eq. 9     x^id = e^id + p_l (TAME.position).
Eq. 10-12 IdEnrichment: g = Softmax(Concat(E^t, E^v) W + b) over N_q = N_q^t + N_q^v experts (modalities in
          cfg.modalities order), x^^id = sum_k g_k (w_k (.) x^id) = x^id (.) (g W_experts).
          ambiguity: the experts' initialisation is not given: init_method like every weight (all ones would make the
          experts equal, and equal experts give the gate no gradient).
          tame_use_id_enrichment=False ("w/o ID enrichment"): x^^id = x^id.
          g is the output's expert_weights (group "id_enrichment"; experts 0..N_q^t-1 are the text queries' vectors),
          which the trainer logs as cammsr/expert_usage/id_enrichment/expert<k>.
IV-C      x^^t = e^t + p_l, x^^v = e^v + p_l.
          ambiguity: one position table per modality or one for all: one for all (the paper writes the same p_l).
Eq. 13    TAME.encoders: one SequenceEncoder per modality, causal and padding-masked; r^m at the last valid position
          (prefix) or at every position (all_positions).
          ambiguity: "Transformer" is not specified: RecBole's SASRec form (input LayerNorm + dropout, post-LN GELU
          blocks), that of the paper's SASRec baseline and of this project's encoders.
Eq. 14    item_candidates -> [N + 1, M, d] = (ID candidate, e^t, e^v); score = sum_m r^m . candidate_m.
          ambiguity: the ID candidate: tame_candidate_id "raw" (default, e_i^id as written) or "enriched" (Eq. 10
          on e_i^id without position, gated by the candidate's own retrieved vectors).
          ambiguity: the content candidates: e^_i of Eq. 7 (the symbols Eq. 14 writes), without position.
Eq. 16    TargetContrast "cl" on the ID modality (the trainer builds it from the targets): -log softmax_j(cos(r^id_a,
          e^id_j) / tau)[a] over the batch's scored targets, e^id: Eq. 14's ID candidate of the target (raw by
          default); in all-positions mode every scored position is an anchor and its own window's other positions
          are not its negatives (the paper's batch holds one prefix per sequence). tau is not given:
          tame_cl_temperature 1, like mscl_temperature. Training only.
Eq. 17    L = L_CE + tame_cl_weight * L_CL (Eq. 17: weight 1).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, SequentialRecommender, TargetContrast
from .config import ModelConfig
from .layers import SequenceEncoder, StandardizingLinear, causal_padding_mask, init_weights_

CONTENT_MODALITIES = ("text", "image")


def token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[..., T, F] -> [..., T] True where a token is not padding (not all zeros)."""
    return tokens.any(dim=-1)


class TokenStandardizer(nn.Module):
    """Per-dimension z-scores / sqrt(F) of token vectors, with statistics over the catalogue's non-padding tokens
    (ItemRepresentation's rule and reason, applied to tokens: a token has unit norm on average)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("inv_std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, table: torch.Tensor, chunk_size: int) -> None:
        """table [N + 1, T, F], a chunk of items at a time (the token table of a catalogue can be gigabytes)."""
        dim = table.shape[-1]
        count = table.new_zeros((), dtype=torch.float64)
        total = table.new_zeros(dim, dtype=torch.float64)
        squares = table.new_zeros(dim, dtype=torch.float64)
        for start in range(0, table.shape[0], chunk_size):
            chunk = table[start:start + chunk_size]
            tokens = chunk[token_mask(chunk)].double()
            count += tokens.shape[0]
            total += tokens.sum(dim=0)
            squares += tokens.square().sum(dim=0)
        if count < 2:  # no statistics to take (e.g. a catalogue without images): tokens stay as they are
            return
        mean = total / count
        variance = (squares - count * mean.square()) / (count - 1)
        self.mean.copy_(mean)
        self.inv_std.copy_((variance.clamp_min(0).sqrt().clamp_min(1e-4) * math.sqrt(dim)).reciprocal())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # in fp32: encoder outputs share a large common direction that a bf16 subtraction would round away
        return ((tokens.float() - self.mean) * self.inv_std).to(tokens.dtype)


class MultiHeadAttention(nn.Module):
    """Concat(head_1..head_h) W^O, head_n = Attention(Q W_n^Q, K W_n^K, K W_n^V), inner width split over h heads."""

    def __init__(self, query_dim: int, key_dim: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(query_dim, width)
        self.key_value = StandardizingLinear(key_dim, 2 * width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None,
                key_standardizer: TokenStandardizer | None = None) -> torch.Tensor:
        """queries [n, q, D_q], keys [n, k, D_k], key_mask [n, k] (True = attend, >= 1 per row) -> [n, q, out];
        key_standardizer: applied to the keys first (folded into their projection)."""
        n, num_queries, _ = queries.shape
        q = self.query(queries).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (part.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                for part in self._key_values(keys, key_standardizer).chunk(2, -1))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attended.transpose(1, 2).reshape(n, num_queries, -1))

    def _key_values(self, keys: torch.Tensor, standardizer: TokenStandardizer | None) -> torch.Tensor:
        if standardizer is None:
            return self.key_value(keys)
        return self.key_value(keys, standardizer.mean, standardizer.inv_std)


class ModalityRetriever(nn.Module):
    """ID-aware query-based retriever of one modality (Eq. 3-6): [n, d] ID rows and [n, T, F] tokens -> [n, N_q, d]."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, num_queries: int, heads: int):
        super().__init__()
        d = cfg.hidden_size
        width = d if cfg.tame_cross_attention_width == "hidden" else feature_dim
        if width % heads:
            raise ValueError(f"tame_cross_attention_width='feature': {heads} retriever heads must divide the feature "
                             f"size {feature_dim}")
        self.queries = nn.Parameter(torch.empty(num_queries, d))
        self.self_attention = MultiHeadAttention(d, d, d, heads, d)
        self.cross_attention = MultiHeadAttention(d, feature_dim, width, heads, d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_inner_size), nn.GELU(), nn.Linear(cfg.ffn_inner_size, d))
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def reset_parameters_with(self, init) -> None:
        init(self.queries)

    def forward(self, id_rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                standardizer: TokenStandardizer | None = None) -> torch.Tensor:
        queries = self.queries.expand(id_rows.shape[0], -1, -1)
        id_aware = self.self_attention(queries, torch.cat([queries, id_rows[:, None]], dim=1))  # Eq. 3-4
        retrieved = self.cross_attention(id_aware, tokens, mask, standardizer)                  # Eq. 5
        return self.norm(retrieved + self.dropout(self.ffn(retrieved)))                         # Eq. 6


class ClsProjection(nn.Module):
    """"w/o modality retriever": an MLP from the [CLS] token to N_q vectors, LayerNorm-ed like the retriever's."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, num_queries: int):
        super().__init__()
        self.num_queries = num_queries
        self.mlp = nn.Sequential(nn.Linear(feature_dim, cfg.ffn_inner_size), nn.GELU(),
                                 nn.Linear(cfg.ffn_inner_size, num_queries * cfg.hidden_size))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, id_rows: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                standardizer: TokenStandardizer | None = None) -> torch.Tensor:
        cls = tokens[:, 0] if standardizer is None else standardizer(tokens[:, 0])
        return self.norm(self.mlp(cls).unflatten(-1, (self.num_queries, -1)))


class GatedAggregation(nn.Module):
    """Eq. 7-8: e^ = sum_j g_j E^_j with g = Concat(E^) W_g + b_g (optionally softmax-normalised)."""

    def __init__(self, hidden: int, num_queries: int, softmax: bool):
        super().__init__()
        self.gate = nn.Linear(num_queries * hidden, num_queries)
        self.softmax = softmax

    def forward(self, retrieved: torch.Tensor) -> torch.Tensor:
        """[..., N_q, d] -> [..., d]."""
        weights = self.gate(retrieved.flatten(-2))
        if self.softmax:
            weights = weights.softmax(dim=-1)
        return (weights[..., None] * retrieved).sum(dim=-2)


class IdEnrichment(nn.Module):
    """Eq. 10-12: sum_k g_k (w_k (.) x) with g = Softmax(z W + b), z the concatenated retrieved vectors."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(num_experts * hidden, num_experts)
        self.experts = nn.Parameter(torch.empty(num_experts, hidden))

    def reset_parameters_with(self, init) -> None:
        init(self.experts)

    def routing(self, retrieved: torch.Tensor) -> torch.Tensor:
        """Eq. 12's g: retrieved [..., N_q, d] -> [..., N_q]."""
        return self.gate(retrieved.flatten(-2)).softmax(dim=-1)

    def forward(self, x: torch.Tensor, retrieved: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., d], retrieved [..., N_q, d] (weights: their routing, when already computed) -> [..., d]."""
        weights = self.routing(retrieved) if weights is None else weights
        return x * (weights @ self.experts)


class TAME(SequentialRecommender):
    def __init__(self, cfg: ModelConfig, text_dim: int, image_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.content = tuple(m for m in cfg.modalities if m in CONTENT_MODALITIES)
        feature_dims = {"text": text_dim, "image": image_dim}
        queries = {"text": cfg.tame_text_queries, "image": cfg.tame_image_queries}
        heads = {"text": cfg.tame_text_heads, "image": cfg.tame_image_heads}
        self.standardizers = nn.ModuleDict()
        self.retrievers = nn.ModuleDict()
        self.aggregations = nn.ModuleDict()
        for modality in self.content:
            dim = feature_dims[modality]
            if dim < 1:
                raise ValueError(f"{modality}_dim={dim}: modality {modality!r} is enabled but has no features")
            if cfg.feature_normalization == "standardize":
                self.standardizers[modality] = TokenStandardizer(dim)
            self.retrievers[modality] = (ModalityRetriever(cfg, dim, queries[modality], heads[modality])
                                         if cfg.tame_use_retriever else ClsProjection(cfg, dim, queries[modality]))
            self.aggregations[modality] = GatedAggregation(d, queries[modality],
                                                           cfg.tame_aggregation_gate == "softmax")
        num_experts = sum(queries[m] for m in self.content)
        self.enrichment = IdEnrichment(d, num_experts) if cfg.tame_use_id_enrichment else None
        self.position = nn.Embedding(cfg.max_seq_len, d)
        self.encoders = nn.ModuleList(
            SequenceEncoder(d, cfg.num_heads, cfg.num_layers, cfg.ffn_inner_size, cfg.hidden_dropout,
                            cfg.attn_dropout, input_norm=nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                            block_norm_factory=lambda: nn.LayerNorm(d, eps=cfg.layer_norm_eps))
            for _ in cfg.modalities)
        self._id_index = cfg.modalities.index("id")
        self._kept_layout = None
        init_weights_(self, cfg.init_method)

    def fit_feature_statistics(self, text_table=None, image_table=None) -> None:
        """Token tables [N + 1, T, F] (or None): statistics over their non-padding tokens."""
        for modality, table in (("text", text_table), ("image", image_table)):
            if table is not None and modality in self.standardizers:
                self.standardizers[modality].fit(table, self.cfg.tame_item_chunk_size)

    def retrieve(self, id_rows: torch.Tensor, tokens: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Eq. 3-6 per content modality: id_rows [n, d], tokens {modality: [n, T, F]} (masks: their token_mask, when
        already computed) -> {modality: [n, N_q, d]}, zero for an item without tokens."""
        retrieved = {}
        for modality in self.content:
            rows = tokens[modality]
            if rows is None:
                raise ValueError(f"modality {modality!r} is enabled but its input is None")
            mask = token_mask(rows) if masks is None else masks[modality]
            has_tokens = mask.any(dim=-1)
            standardizer = self.standardizers[modality] if modality in self.standardizers else None
            # a row without keys would make the attention NaN: it attends to its zeros, then its output is dropped
            vectors = self.retrievers[modality](id_rows, rows, mask | ~has_tokens[:, None], standardizer)
            retrieved[modality] = vectors * has_tokens[:, None, None].to(vectors.dtype)
        return retrieved

    def retrieve_by_length(self, id_rows: torch.Tensor, tokens: dict[str, torch.Tensor | None],
                           catalogue: bool = False) -> dict[str, torch.Tensor]:
        """`retrieve` on tame_item_chunk_size items at a time, taken in order of their token count, each chunk's
        token axis cut after its longest item's last token: the padding a chunk drops is work the keys' projection
        and the attention no longer do (Beauty's titles: 31 tokens on average, padded to 64), and attention over
        masked keys is the same with them or without. The chunks' tokens are read in the ID rows' dtype.
        `catalogue`: the tables are the catalogue's, whose chunks are kept for the next call on the very same
        tables (see _length_layout)."""
        present = {m: tokens[m] for m in self.content if tokens.get(m) is not None}
        if len(present) < len(self.content) or id_rows.shape[0] == 0:
            return self.retrieve(id_rows, tokens)
        order, chunks = self._length_layout(present, catalogue, id_rows.dtype)
        parts = [self.retrieve(id_rows[index], rows, masks) for index, rows, masks in chunks]
        restore = order.argsort()
        return {m: torch.cat([part[m] for part in parts])[restore] for m in self.content}

    def _length_layout(self, tokens: dict[str, torch.Tensor], keep: bool,
                       dtype: torch.dtype) -> tuple[torch.Tensor, list]:
        """The items in order of token count and, per tame_item_chunk_size of them, (their index, their token rows
        and masks cut after the chunk's longest item). With `keep`, the layout is reused while the same table
        objects come back unchanged (same in-place version) and need no gradient: a full-softmax step passes the
        catalogue's frozen tables every time, and computing their masks and copying their rows out chunk by chunk
        read every token of every item, a large part of the retrieval's cost on a CPU (the kept rows are the
        tables' non-padding part once more). Weak references: the cache holds no table alive."""
        versions = ({m: rows._version for m, rows in tokens.items()}, dtype)
        keep = keep and not any(rows.requires_grad for rows in tokens.values())
        kept = self._kept_layout if keep else None
        if kept is not None and kept[0].keys() == tokens.keys() and kept[1] == versions \
                and all(kept[0][m]() is tokens[m] for m in tokens):
            return kept[2]
        masks = {m: token_mask(rows) for m, rows in tokens.items()}
        extents = {m: (mask * torch.arange(1, mask.shape[-1] + 1, device=mask.device)).amax(dim=-1)
                   for m, mask in masks.items()}
        order = sum(extents.values()).argsort()
        ordered = {m: extents[m][order].tolist() for m in tokens}  # one host copy, not a device sync per chunk
        chunks, size = [], self.cfg.tame_item_chunk_size
        for start in range(0, order.shape[0], size):
            index = order[start: start + size]
            widths = {m: max(max(ordered[m][start: start + size]), 1) for m in tokens}
            chunks.append((index, {m: tokens[m][index, :widths[m]].to(dtype) for m in tokens},
                           {m: masks[m][index, :widths[m]] for m in tokens}))
        layout = (order, chunks)
        if keep:
            self._kept_layout = ({m: weakref.ref(rows) for m, rows in tokens.items()}, versions, layout)
        return layout

    def _enrich(self, id_rows: torch.Tensor, retrieved: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 10-12 on [n, d] rows and the routing weights [n, N_q] (the rows and None without ID enrichment)."""
        if self.enrichment is None:
            return id_rows, None
        vectors = torch.cat([retrieved[m] for m in self.content], dim=-2)
        weights = self.enrichment.routing(vectors)
        return self.enrichment(id_rows, vectors, weights), weights

    def _id_candidates(self, id_rows: torch.Tensor, retrieved: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._enrich(id_rows, retrieved)[0] if self.cfg.tame_candidate_id == "enriched" else id_rows

    def candidates_of(self, ids: torch.Tensor, id_rows: torch.Tensor, text_table: torch.Tensor | None = None,
                      image_table: torch.Tensor | None = None) -> torch.Tensor:
        """Where `ids` cover half the catalogue or more (per-target negatives draw nearly every item at every step),
        the whole catalogue is retrieved through its kept layout (ID rows of the other items zero, their results
        dropped) and the ids' rows are read out: gathering the ids' token rows would copy most of the tables at
        every step, and laying the copy out by length reads every token again; on a CPU that was most of a step."""
        tables = {"text": text_table, "image": image_table}
        if not self.content or any(tables[m] is None for m in self.content) \
                or 2 * ids.shape[0] < tables[self.content[0]].shape[0]:
            return super().candidates_of(ids, id_rows, text_table, image_table)
        every_id_row = id_rows.new_zeros(tables[self.content[0]].shape[0], id_rows.shape[1])
        return self.item_candidates(every_id_row.index_copy(0, ids, id_rows), text_table, image_table)[ids]

    def item_candidates(self, id_rows, text_rows=None, image_rows=None) -> torch.Tensor:
        """Eq. 14's item side, [N + 1, M, d]: (ID candidate, e^t, e^v), retrieved by `retrieve_by_length`."""
        retrieved = self.retrieve_by_length(id_rows, {"text": text_rows, "image": image_rows}, catalogue=True)
        return torch.stack([self._id_candidates(id_rows, retrieved) if m == "id"
                            else self.aggregations[m](retrieved[m]) for m in self.cfg.modalities], dim=-2)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor, id_emb: torch.Tensor,
                text_feat: torch.Tensor | None = None, image_feat: torch.Tensor | None = None,
                cat_labels=None, has_cat=None, time_seq=None) -> ModelOutput:
        """The category and time arguments are accepted and not used. Only the valid positions' items are retrieved
        (most of a prefix batch is padding); the rest of the sequence stays zero."""
        valid = item_seq != 0
        ids = id_emb[valid]                                                                # [n, d]
        retrieved = self.retrieve_by_length(ids, {"text": None if text_feat is None else text_feat[valid],
                                                  "image": None if image_feat is None else image_feat[valid]})
        # through the embedding's forward: ZeRO-3 gathers a module's weight there (the root model reading a child's
        # weight directly gets a shard that is released again before the backward accumulates into it)
        positions = self.position(torch.arange(item_seq.shape[1], device=item_seq.device))
        positions = positions.expand(item_seq.shape[0], -1, -1)[valid]
        enriched, routing = self._enrich(ids + positions, retrieved)                             # Eq. 9-12
        items = torch.stack([enriched if m == "id"
                             else self.aggregations[m](retrieved[m]) + positions                 # Eq. 7-8, IV-C
                             for m in self.cfg.modalities], dim=-2)
        sequences = items.new_zeros(*item_seq.shape, *items.shape[1:])
        sequences[valid] = items
        mask = causal_padding_mask(valid)
        hidden = torch.stack([encoder(sequences[:, :, m], mask) for m, encoder in enumerate(self.encoders)],
                             dim=2)                                                              # Eq. 13
        if self.cfg.sequence_mode == "prefix":
            user = hidden[torch.arange(hidden.shape[0], device=hidden.device), seq_len - 1]
        else:
            user = hidden
        contrasts = []
        if self.training and self.cfg.tame_cl_weight > 0:
            contrasts.append(TargetContrast("cl", self._id_index, self.cfg.tame_cl_weight,
                                            self.cfg.tame_cl_temperature))
        expert_weights = None
        if routing is not None:  # for monitoring: Eq. 12's weights at each valid position, zero at padding
            expert_weights = routing.new_zeros(*item_seq.shape, 1, routing.shape[-1])
            expert_weights[valid] = routing[:, None]
        return ModelOutput(user_vectors=user, valid=valid, target_contrasts=contrasts, expert_weights=expert_weights,
                           expert_groups=("id_enrichment",))
