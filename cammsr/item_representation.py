"""Item representation initialisation (Section IV-A): ID rows, projected frozen features, positions."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import StandardizingLinear


class ItemRepresentation(nn.Module):
    """x_m for each enabled modality (Eq. 4: trainable projections of frozen text/image features) and
    e_m = x_m + p (position embedding; `with_position=False` for models that have no positions, which then use
    `project` alone). Modalities are stacked on a new axis in `cfg.modalities` order.

    ID rows are looked up by the trainer (so the table can be a sharded TorchRec collection) and passed in.
    """

    def __init__(self, cfg: ModelConfig, text_dim: int, image_dim: int, with_position: bool = True):
        super().__init__()
        self.modalities = cfg.modalities
        self.standardize = cfg.feature_normalization == "standardize"
        self.projections = nn.ModuleDict()
        for modality, dim in (("text", text_dim), ("image", image_dim)):
            if modality in cfg.modalities:
                if dim < 1:
                    raise ValueError(f"{modality}_dim={dim}: modality {modality!r} is enabled but has no features")
                self.projections[modality] = StandardizingLinear(dim, cfg.hidden_size)
                if self.standardize:
                    self.register_buffer(f"{modality}_mean", torch.zeros(dim))
                    self.register_buffer(f"{modality}_inv_std", torch.ones(dim))
        if with_position:
            self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)

    @torch.no_grad()
    def fit_feature_statistics(self, modality: str, table: torch.Tensor, present: torch.Tensor) -> None:
        """Per-dimension mean and scale of the catalogue's `table` rows where `present` (a no-op for "none")."""
        if not self.standardize or modality not in self.projections:
            return
        rows = table[present].float()
        if rows.shape[0] < 2:  # no statistics to take (e.g. a catalogue without images): rows stay as they are
            return
        getattr(self, f"{modality}_mean").copy_(rows.mean(dim=0))
        # z-scores / sqrt(F): a feature row has unit norm on average, like the Xavier-scale inputs the
        # projection's initialisation assumes (plain z-scores made the first loss ~4x ln N).
        scale = rows.std(dim=0).clamp_min(1e-4) * rows.shape[1] ** 0.5
        getattr(self, f"{modality}_inv_std").copy_(scale.reciprocal())

    def fit_tables(self, text_table: torch.Tensor | None, image_table: torch.Tensor | None) -> None:
        """`fit_feature_statistics` of each given catalogue table ([N + 1, F]; all-zero rows: items without it)."""
        for modality, table in (("text", text_table), ("image", image_table)):
            if table is not None:
                self.fit_feature_statistics(modality, table, table.abs().sum(dim=1) > 0)

    def _features(self, modality: str, rows: torch.Tensor) -> torch.Tensor:
        if not self.standardize:
            return self.projections[modality](rows)
        return self.projections[modality](rows, getattr(self, f"{modality}_mean"),
                                          getattr(self, f"{modality}_inv_std")).to(rows.dtype)

    def project(self, id_rows: torch.Tensor | None, text_rows: torch.Tensor | None,
                image_rows: torch.Tensor | None) -> torch.Tensor:
        """[..., d] / [..., F_t] / [..., F_v] -> x as [..., M, d]. Works for sequences and for item tables."""
        given = {"id": id_rows, "text": text_rows, "image": image_rows}
        stacked = []
        for modality in self.modalities:
            rows = given[modality]
            if rows is None:
                raise ValueError(f"modality {modality!r} is enabled but its input is None")
            stacked.append(rows if modality == "id" else self._features(modality, rows))
        return torch.stack(stacked, dim=-2)

    def forward(self, id_emb, text_feat, image_feat) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [B, L, *] -> (x, e), both [B, L, M, d]."""
        x = self.project(id_emb, text_feat, image_feat)
        positions = self.position.weight[: x.shape[1]]
        return x, x + positions[:, None, :]
