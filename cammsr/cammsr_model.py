"""CAMMSR (Section IV): item representations -> CAMoE -> per-modality Transformers -> Eq. 15 scoring, + MSCL."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, SequentialRecommender
from .camoe import MixtureOfExperts
from .category_guidance import CategoryGuidance
from .config import ModelConfig
from .item_representation import ItemRepresentation
from .layers import SequenceEncoder, causal_padding_mask, gather_positions, make_norm, init_weights_
from .mscl import modality_swap


class CAMMSR(SequentialRecommender):
    def __init__(self, cfg: ModelConfig, num_categories: int, text_dim: int, image_dim: int):
        super().__init__()
        self.cfg = cfg
        self.items = ItemRepresentation(cfg, text_dim, image_dim)
        self.moe = MixtureOfExperts(cfg)
        self.category_guidance = CategoryGuidance(cfg, num_categories) if cfg.use_category_guidance else None
        d = cfg.hidden_size

        def norm(use_dyt: bool) -> nn.Module:
            return make_norm(d, use_dyt, cfg.layer_norm_eps, cfg.dyt_alpha_init, cfg.dyt_affine)

        block_uses_dyt = cfg.use_dyt and cfg.dyt_in_blocks
        self.encoders = nn.ModuleList(
            SequenceEncoder(d, cfg.num_heads, cfg.num_layers, cfg.ffn_inner_size, cfg.hidden_dropout,
                            cfg.attn_dropout, input_norm=norm(cfg.use_dyt),
                            block_norm_factory=lambda: norm(block_uses_dyt))
            for _ in cfg.modalities)
        self._modality_index = {m: i for i, m in enumerate(cfg.modalities)}
        self.id_only = False
        init_weights_(self, cfg.init_method)

    def set_id_only(self, id_only: bool) -> None:
        """Score with the ID pathway alone, MSCL off (the trainer's ID warm-up epochs); the content pathways wait."""
        if id_only and "id" not in self._modality_index:
            raise ValueError(f"ID-only scoring needs the 'id' modality; modalities are {self.cfg.modalities}")
        self.id_only = id_only

    def fit_feature_statistics(self, text_table=None, image_table=None) -> None:
        self.items.fit_tables(text_table, image_table)

    def item_candidates(self, id_rows, text_rows=None, image_rows=None) -> torch.Tensor:
        """Candidate vectors per modality, [N + 1, M, d]: the projected features x (no position, no CAMoE)."""
        return self.items.project(id_rows, text_rows, image_rows)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor, id_emb: torch.Tensor | None,
                text_feat: torch.Tensor | None = None, image_feat: torch.Tensor | None = None,
                cat_labels: torch.Tensor | None = None, has_cat: torch.Tensor | None = None,
                time_seq: torch.Tensor | None = None) -> ModelOutput:
        """time_seq is accepted and not used: CAMMSR has no explicit time."""
        valid = item_seq != 0
        _, e = self.items(id_emb, text_feat, image_feat)                       # [B, L, M, d]
        e_hat, expert_weights = self.moe(e, valid)
        if self.category_guidance is None:
            weights = torch.full(e.shape[:-1], 1.0 / self.cfg.num_modalities, device=e.device)
            category_loss = None
        else:
            weights, category_loss = self.category_guidance(e, valid, cat_labels, has_cat)
        fused = (e + weights[..., None].to(e_hat.dtype) * e_hat) * valid[..., None, None]  # Eq. 11
        attention_mask = causal_padding_mask(valid)
        last = seq_len - 1
        hidden, views = self._encode(fused, valid, attention_mask, last)  # [B, L, M, d]
        if self.cfg.sequence_mode == "prefix":
            user = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, M, d]
        else:
            user = hidden
        return ModelOutput(
            user_vectors=user, valid=valid, score_offset=self._score_offset(user, seq_len),
            modality_weights=weights, expert_weights=expert_weights, category_loss=category_loss, mscl_views=views)

    def _scores(self, modality_index: int) -> bool:
        return not self.id_only or self.cfg.modalities[modality_index] == "id"

    def _mscl_active(self) -> bool:
        return self.training and not self.id_only and bool(self.cfg.mscl_pairs) and self.cfg.mscl_weight > 0

    def _encode(self, fused, valid, attention_mask, last):
        """Each modality's Transformer over its fused sequence (Eq. 14) and, while training, over the MSCL swap
        views it encodes (Eq. 16-17): one pass per encoder, the views stacked under the batch, since a step of a
        model this small costs its number of dispatched ops, not its arithmetic.

        Returns hidden [B, L, M, d] and the (Z_aug^{m1}, Z_aug^{m2}) pair of each MSCL pair (Eq. 18's inputs) at its
        anchors.
        """
        inputs = [[fused[:, :, m]] for m in range(len(self.encoders))]
        slots = []  # per pair: (encoder, index in its inputs) of each view
        if self._mscl_active():
            for first, second in self.cfg.mscl_pairs:
                i, j = self._modality_index[first], self._modality_index[second]
                seq_i, seq_j, _ = modality_swap(fused[:, :, i], fused[:, :, j], valid, self.cfg.mscl_swap_prob)
                slots.append(((i, len(inputs[i])), (j, len(inputs[j]))))
                inputs[i].append(seq_i)
                inputs[j].append(seq_j)
        batch = fused.shape[0]
        outputs = []
        for m, encoder in enumerate(self.encoders):
            if not self._scores(m):
                outputs.append([torch.zeros_like(fused[:, :, m])])
                continue
            stacked = torch.cat(inputs[m]) if len(inputs[m]) > 1 else inputs[m][0]
            mask = attention_mask.repeat(len(inputs[m]), 1, 1, 1) if len(inputs[m]) > 1 else attention_mask
            outputs.append(encoder(stacked, mask).split(batch))
        hidden = torch.stack([out[0] for out in outputs], dim=2)
        views = [(self._anchor_view(outputs[i][a], last), self._anchor_view(outputs[j][b], last))
                 for (i, a), (j, b) in slots]
        return hidden, views

    def _anchor_view(self, view: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """An encoded swap view [B, L, d] at its MSCL anchors: every position, or each row's last as [B, d]."""
        return view if self.cfg.mscl_anchors == "every_prefix" else gather_positions(view, last)

    def _score_offset(self, user: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor | None:
        """Literal Eq. 15: sum_m Z^m . p at the position the target would take (clamped to the table)."""
        if not self.cfg.score_with_position:
            return None
        table = self.items.position.weight
        top = self.cfg.max_seq_len - 1
        if self.cfg.sequence_mode == "prefix":
            return torch.einsum("bmd,bd->b", user, table[seq_len.clamp(max=top)])
        positions = torch.arange(1, user.shape[1] + 1, device=user.device).clamp(max=top)
        return torch.einsum("blmd,ld->bl", user, table[positions])
