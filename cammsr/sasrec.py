"""SASRec baseline with RecBole's semantics, behind the same interface as CAMMSR (ID modality only)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, SequentialRecommender
from .config import ModelConfig
from .layers import SequenceEncoder, causal_padding_mask, gather_positions, init_weights_


class SASRec(SequentialRecommender):
    """Learned positions, LayerNorm + dropout on the input, post-LN GELU blocks, causal padded attention,
    last valid position as the user vector, scored against the (tied) item-ID table (RecBole's). With
    block_style="sasrec" and position_from="end": the SASRec paper's blocks and RecTools' inverse positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.position = nn.Embedding(cfg.max_seq_len, d)
        self.encoder = SequenceEncoder(d, cfg.num_heads, cfg.num_layers, cfg.ffn_inner_size, cfg.hidden_dropout,
                                       cfg.attn_dropout, input_norm=nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                                       block_norm_factory=lambda: nn.LayerNorm(d, eps=cfg.layer_norm_eps),
                                       style=cfg.block_style)
        init_weights_(self, cfg.init_method)

    def _positions(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """Position embeddings [L, d] counted from the first item, or [B, L, d] counted back from each row's last
        item (position_from="end", RecTools' inverse positions: the latest item always gets position 0)."""
        if self.cfg.position_from == "start":
            return self.position.weight[: item_seq.shape[1]]
        steps = torch.arange(item_seq.shape[1], device=item_seq.device)
        return self.position((seq_len[:, None] - 1 - steps[None, :]).clamp(min=0))

    def item_candidates(self, id_rows, text_rows=None, image_rows=None) -> torch.Tensor:
        """[N + 1, 1, d]: the ID table itself (tied scoring); feature rows are not used."""
        return id_rows[:, None, :]

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor, id_emb: torch.Tensor,
                text_feat=None, image_feat=None, cat_labels=None, has_cat=None, time_seq=None) -> ModelOutput:
        """Same call as CAMMSR; the feature, category and time arguments are accepted and not used."""
        valid = item_seq != 0
        hidden = self.encoder(id_emb + self._positions(item_seq, seq_len), causal_padding_mask(valid))
        if self.cfg.sequence_mode == "prefix":
            user = gather_positions(hidden, seq_len - 1)[:, None, :]
        else:
            user = hidden[:, :, None, :]
        return ModelOutput(user_vectors=user, valid=valid)
