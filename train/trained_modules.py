"""What the DeepSpeed engine trains when encoders train with the recommender: the recommender and the encoder
modules whose parameters train (an encoder with top layers or LoRA adapters, or a side adapter network), so that
their parameters are in the engine's optimizer, sharded by ZeRO and saved in its checkpoints. The engine calls the
recommender; train.media calls the encoders inside the same step, so their gradients flow into the same backward.

Frozen encoders are never wrapped: a run whose encoders all stay frozen has the engine module (and the checkpoint
keys) of cached mode.
"""

from __future__ import annotations

from torch import nn


class RecommenderWithEncoders(nn.Module):
    def __init__(self, recommender: nn.Module, encoders: dict[str, nn.Module]):
        super().__init__()
        self.recommender = recommender
        self.encoders = nn.ModuleDict(encoders)

    def forward(self, *args, **kwargs):
        return self.recommender(*args, **kwargs)


def recommender_of(module: nn.Module) -> nn.Module:
    """The recommender inside an engine's module, wrapped or not."""
    return module.recommender if isinstance(module, RecommenderWithEncoders) else module
