"""HM4SR (Hierarchical Time-Aware Mixture of Experts for Multi-Modal Sequential Recommendation, paper 003):
item representations -> Interactive MoE -> Temporal MoE -> one Transformer per modality -> summed logits, with the
auxiliary tasks CP, IDCL and PCL.

| paper | code |
|---|---|
| Eq. 2-6: x_m = W_m f_m + b_m, e_m = x_m + p | `ItemRepresentation` (CAMMSR's: the same projection and positions) |
| Eq. 7-10: e'_m = e_m + alpha_m sum_i g_i^m (W_{i,m} [e_id; e_txt; e_img] + b_{i,m}), g^m = softmax(W_1m e_m + b_1m) | `InteractiveMoE` |
| Eq. 11-12: a_i = t_i - t_{i-1} (a_1 = 0), pos_i = floor(mu log(a_i + 1)) -> r_1 | `TimeEmbeddings.intervals` |
| Eq. 13: r_2[j] = cos(l_j t / freq^(j/d) + z_j) | `TimeEmbeddings.absolute` |
| Eq. 14-16: x_temp = sum_i g'_i (W_i^temp (.) [e'_id; e'_txt; e'_img]), g' = softmax(W_2 [r_1; r_2] + b_2) | `TemporalMoE` |
| Eq. 17-18: H^m = Transformer_m(Dropout(LayerNorm(S_m))) | `SequenceEncoder` per modality (RecBole's blocks) |
| Eq. 19: y_v = sum_m H^m . x_m | `item_candidates` = the projected x (no position); the trainer sums |
| Eq. 20: cross-entropy over all items | the trainer's recommendation loss (full or sampled softmax) |
| Eq. 21-22: CP, BCE of W_CP x_temp + b_CP against the item's multi-hot categories | `_category_prediction` |
| Eq. 23: IDCL, InfoNCE(H^id, x_id of the target) over the batch, cosine / tau | a `TargetContrast` on the ID modality |
| Eq. 24-26: PCL, items replaced by W_{P,m} [r_1; r_2] + b_{P,m} with probability beta; InfoNCE(H^m, H^{m,1}) over the batch, averaged over the content modalities | `_placeholder_views` + `BatchTerm`s |
| Eq. 27: L = L_main + l1 L_CP + l2 L_IDCL + l3 L_PCL | the weights `hm4sr_{cp,idcl,pcl}_weight` |

Ambiguities (reading chosen, why):
- Time unit: the paper does not give one. Timestamps are read in units of `hm4sr_time_unit_s` (default one day:
  Amazon's review times are dates, so second-granular intervals would leave every bucket between 0 and
  floor(100 log 86401) = 1136 empty). Intervals longer than `hm4sr_max_interval` units share the last bucket.
- Eq. 13's t: the absolute time in those units since the Unix epoch (the paper writes t); l_j starts at 1 and z_j
  at 0, so the initial encoding is the Transformer's cosine position code of the day number.
- W_i^temp (Eq. 16) starts at ones (each expert initially passes e_temp through) and alpha_m (Eq. 8) at
  `hm4sr_alpha_init`; the paper gives no initialisation. There is no residual around the Temporal MoE (none
  written).
- CP's reduction (Eq. 22 sums over classes, L_CP sums over a sequence's items): `hm4sr_cp_reduction="sum"` is that
  (then averaged over the batch's sequences); "mean" (default) averages over every labelled item and class, as
  RecBole's BCEWithLogitsLoss does: with hundreds of classes and 50 items the literal sum outweighs L_main by two
  orders of magnitude at lambda_1 = 1.
- PCL (Eq. 25) has no temperature: `hm4sr_pcl_temperature` = 1 is the literal reading. Its anchors are each row's
  last position (H^m is "the final hidden vector corresponding to the last position"), also in all-positions mode.
- Items without categories are left out of CP; items without an image or text keep their zero feature rows (as in
  CAMMSR).
- Defaults: k_1 = k_2 = 4, lambda_2 = lambda_3 = 0.5, beta = 0.3, tau = 0.5: the middle of the paper's grids
  (its chosen values were in figures the text extraction lost); mu = 100, freq = 10000, lambda_1 = 1 as written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import BatchTerm, ModelOutput, SequentialRecommender, TargetContrast
from .config import ModelConfig
from .item_representation import ItemRepresentation
from .layers import SequenceEncoder, causal_padding_mask, gather_positions, init_weights_
from .mscl import info_nce


class TimeEmbeddings(nn.Module):
    """r_1 (interval bucket embedding, Eq. 11-12) and r_2 (learnable cosine code of the absolute time, Eq. 13)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.unit_s, self.scale, self.freq = cfg.hm4sr_time_unit_s, cfg.hm4sr_interval_scale, cfg.hm4sr_time_freq
        self.num_buckets = interval_bucket(cfg.hm4sr_max_interval, self.scale) + 1
        self.max_interval = cfg.hm4sr_max_interval
        self.interval = nn.Embedding(self.num_buckets, d)
        self.time_scale = nn.Parameter(torch.ones(d))  # l
        self.time_phase = nn.Parameter(torch.zeros(d))  # z
        self.register_buffer("inverse_frequency", cfg.hm4sr_time_freq ** (-torch.arange(d, dtype=torch.float64) / d),
                             persistent=False)
        self.inputs = cfg.hm4sr_time_inputs

    def intervals(self, time_seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[B, L] seconds -> interval bucket of each position (0 at the first item and at padding)."""
        units = time_seq / self.unit_s
        gaps = torch.zeros_like(units)
        gaps[:, 1:] = (units[:, 1:] - units[:, :-1]).clamp_min(0)
        gaps = gaps.clamp(max=self.max_interval) * valid
        return torch.floor(self.scale * torch.log1p(gaps)).long().clamp(0, self.num_buckets - 1)

    def absolute(self, time_seq: torch.Tensor) -> torch.Tensor:
        """[B, L] seconds -> [B, L, d]: cos(l_j t / freq^(j/d) + z_j), the phase in float64 (t is ~2e4 days)."""
        units = (time_seq / self.unit_s).double()[..., None]
        phase = units * self.inverse_frequency * self.time_scale.double() + self.time_phase.double()
        return torch.cos(phase).to(self.time_scale.dtype)

    def forward(self, time_seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[r_1; r_2] (or the one `hm4sr_time_inputs` keeps), [B, L, len(inputs) * d]."""
        parts = []
        if "interval" in self.inputs:
            parts.append(self.interval(self.intervals(time_seq, valid)))
        if "absolute" in self.inputs:
            parts.append(self.absolute(time_seq).to(self.interval.weight.dtype))
        return torch.cat(parts, dim=-1)


def interval_bucket(interval: float, scale: float) -> int:
    """Eq. 12 for one interval: floor(mu log(a + 1))."""
    return int(math.floor(scale * math.log1p(interval)))


class InteractiveMoE(nn.Module):
    """Eq. 7-10: per target modality m, k_1 linear experts over the concatenated modalities, routed by e_m."""

    def __init__(self, num_modalities: int, d: int, num_experts: int, alpha_init: float):
        super().__init__()
        width = num_modalities * d
        self.expert_weight = nn.Parameter(torch.empty(num_modalities, num_experts, width, d))  # W^inter_{i,m}
        self.expert_bias = nn.Parameter(torch.zeros(num_modalities, num_experts, d))
        self.router_weight = nn.Parameter(torch.empty(num_modalities, d, num_experts))  # W_{1,m}
        self.router_bias = nn.Parameter(torch.zeros(num_modalities, num_experts))
        self.alpha = nn.Parameter(torch.full((num_modalities,), float(alpha_init)))

    def reset_parameters_with(self, init) -> None:
        for m in range(self.expert_weight.shape[0]):
            for i in range(self.expert_weight.shape[1]):
                init(self.expert_weight.data[m, i])
            init(self.router_weight.data[m])

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e [B, L, M, d] -> (e' [B, L, M, d], routing weights g [B, L, M, k_1])."""
        gates = torch.softmax(torch.einsum("blmd,mdk->blmk", e, self.router_weight) + self.router_bias, dim=-1)
        experts = torch.einsum("blw,mkwd->blmkd", e.flatten(-2), self.expert_weight) + self.expert_bias
        mixed = torch.einsum("blmk,blmkd->blmd", gates, experts)
        return e + self.alpha[:, None] * mixed, gates


class TemporalMoE(nn.Module):
    """Eq. 14-16: k_2 element-wise experts over [e'_id; e'_txt; e'_img], routed by the time embeddings."""

    def __init__(self, num_modalities: int, d: int, time_width: int, num_experts: int):
        super().__init__()
        self.router = nn.Linear(time_width, num_experts)  # W_2, b_2
        self.expert_weight = nn.Parameter(torch.ones(num_experts, num_modalities * d))  # W_i^temp

    def forward(self, e: torch.Tensor, time_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e' [B, L, M, d], [r_1; r_2] [B, L, T] -> (x_temp [B, L, M, d], routing weights g' [B, L, k_2])."""
        gates = torch.softmax(self.router(time_emb), dim=-1)
        scale = gates @ self.expert_weight  # sum_i g'_i W_i: the experts are element-wise, so they mix first
        return (e.flatten(-2) * scale).view_as(e), gates


class HM4SR(SequentialRecommender):
    """See the module docstring. Needs the interaction timestamps (`time_seq`) whenever the Temporal MoE is on."""

    def __init__(self, cfg: ModelConfig, num_categories: int, text_dim: int, image_dim: int):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.hidden_size, cfg.num_modalities
        self.items = ItemRepresentation(cfg, text_dim, image_dim)
        self.interactive = (InteractiveMoE(m, d, cfg.hm4sr_interactive_experts, cfg.hm4sr_alpha_init)
                            if cfg.hm4sr_interactive_moe else None)
        self.time = TimeEmbeddings(cfg) if cfg.hm4sr_temporal_moe else None
        time_width = d * len(cfg.hm4sr_time_inputs)
        self.temporal = TemporalMoE(m, d, time_width, cfg.hm4sr_temporal_experts) if cfg.hm4sr_temporal_moe else None
        has_content = any(name != "id" for name in cfg.modalities)
        self.placeholders = (nn.ModuleList(nn.Linear(time_width, d) for _ in cfg.modalities)  # W_{P,m}, b_{P,m}
                             if cfg.hm4sr_temporal_moe and cfg.hm4sr_pcl_weight > 0 and has_content else None)
        self.category_head = (nn.Linear(m * d, num_categories)  # W_CP, b_CP
                              if cfg.hm4sr_cp_weight > 0 and num_categories > 0 else None)
        self.encoders = nn.ModuleList(
            SequenceEncoder(d, cfg.num_heads, cfg.num_layers, cfg.ffn_inner_size, cfg.hidden_dropout,
                            cfg.attn_dropout, input_norm=nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                            block_norm_factory=lambda: nn.LayerNorm(d, eps=cfg.layer_norm_eps))
            for _ in cfg.modalities)
        init_weights_(self, cfg.init_method)
        if self.temporal is not None:  # init_weights_ re-initialises every Linear; W_i^temp stays at ones
            nn.init.ones_(self.temporal.expert_weight)

    def fit_feature_statistics(self, text_table=None, image_table=None) -> None:
        self.items.fit_tables(text_table, image_table)

    def item_candidates(self, id_rows, text_rows=None, image_rows=None) -> torch.Tensor:
        """Eq. 19's x_m of every item, [N + 1, M, d]."""
        return self.items.project(id_rows, text_rows, image_rows)

    def forward(self, item_seq, seq_len, id_emb, text_feat=None, image_feat=None, cat_labels=None, has_cat=None,
                time_seq=None) -> ModelOutput:
        valid = item_seq != 0
        _, e = self.items(id_emb, text_feat, image_feat)  # [B, L, M, d]
        expert_weights = None
        if self.interactive is not None:
            e, expert_weights = self.interactive(e)
        time_emb = None
        if self.temporal is not None:
            if time_seq is None:
                raise ValueError("HM4SR's Temporal MoE needs the interaction timestamps of the sequence (time_seq); "
                                 "set model.hm4sr_temporal_moe=false to run without times")
            time_emb = self.time(time_seq, valid)
            x_temp, _ = self.temporal(e, time_emb)
        else:
            x_temp = e
        x_temp = x_temp * valid[..., None, None]
        mask = causal_padding_mask(valid)
        hidden = self._encode(x_temp, mask)  # [B, L, M, d]
        last = seq_len - 1
        if self.cfg.sequence_mode == "prefix":
            user = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            user = hidden
        output = ModelOutput(user_vectors=user, valid=valid, expert_weights=expert_weights)
        if self.training:
            self._add_auxiliary_tasks(output, hidden, x_temp, time_emb, valid, mask, last, cat_labels, has_cat)
        return output

    def _encode(self, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 17-18 for every modality: [B, L, M, d] -> [B, L, M, d]."""
        return torch.stack([encoder(sequences[:, :, m], mask) for m, encoder in enumerate(self.encoders)], dim=2)

    def _add_auxiliary_tasks(self, output, hidden, x_temp, time_emb, valid, mask, last, cat_labels, has_cat):
        cfg = self.cfg
        if self.category_head is not None and cat_labels is not None:
            output.batch_terms.append(self._category_prediction(x_temp, cat_labels, has_cat & valid))
        if cfg.hm4sr_idcl_weight > 0:
            output.target_contrasts.append(TargetContrast("idcl", cfg.modalities.index("id"), cfg.hm4sr_idcl_weight,
                                                          cfg.hm4sr_idcl_temperature))
        if self.placeholders is not None:
            output.batch_terms.append(self._placeholder_contrast(hidden, x_temp, time_emb, valid, mask, last))

    def _category_prediction(self, x_temp, cat_labels, labelled) -> BatchTerm:
        """Eq. 21-22 per row: (BCE summed over the row's labelled items and classes, number of item-class pairs)."""
        logits = self.category_head(x_temp.flatten(-2))
        bce = F.binary_cross_entropy_with_logits(logits.float(), cat_labels.float(), reduction="none").sum(-1)
        row_sum = (bce * labelled).sum(1)
        row_pairs = labelled.sum(1).float() * cat_labels.shape[-1]
        per_sequence = self.cfg.hm4sr_cp_reduction == "sum"

        def category_loss(tensors, real):
            sums, pairs = tensors
            if per_sequence:
                return sums[real].sum() / real.sum().clamp_min(1)
            return sums[real].sum() / pairs[real].sum().clamp_min(1)

        return BatchTerm("cp", self.cfg.hm4sr_cp_weight, (row_sum, row_pairs), category_loss)

    def _placeholder_views(self, x_temp, time_emb, valid) -> torch.Tensor:
        """Eq. 24: each valid position replaced, with probability beta, by W_{P,m} [r_1; r_2] + b_{P,m}."""
        replaced = (torch.rand(valid.shape, device=valid.device) < self.cfg.hm4sr_pcl_ratio) & valid
        stand_ins = torch.stack([placeholder(time_emb) for placeholder in self.placeholders], dim=2)
        return torch.where(replaced[..., None, None], stand_ins.to(x_temp.dtype), x_temp)

    def _placeholder_contrast(self, hidden, x_temp, time_emb, valid, mask, last) -> BatchTerm:
        """Eq. 25-26 on the content modalities (text, image): InfoNCE(H^m, H^{m,1}) at each row's last position."""
        content = [m for m, name in enumerate(self.cfg.modalities) if name != "id"]
        augmented = self._placeholder_views(x_temp, time_emb, valid)
        views = []
        for m in content:
            views.append(gather_positions(hidden[:, :, m], last))
            views.append(gather_positions(self.encoders[m](augmented[:, :, m], mask), last))
        temperature = self.cfg.hm4sr_pcl_temperature

        def placeholder_loss(tensors, real):
            pairs = [(tensors[i][real], tensors[i + 1][real]) for i in range(0, len(tensors), 2)]
            return sum(info_nce(a, b, temperature) for a, b in pairs) / len(pairs)

        return BatchTerm("pcl", self.cfg.hm4sr_pcl_weight, tuple(views), placeholder_loss)
