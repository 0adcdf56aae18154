"""build_model: the one place that maps a ModelConfig to a model class."""

from __future__ import annotations

from .base import SequentialRecommender
from .cammsr_model import CAMMSR
from .config import ModelConfig
from .sasrec import SASRec


def build_model(cfg: ModelConfig, num_categories: int = 0, text_dim: int = 0,
                image_dim: int = 0) -> SequentialRecommender:
    if cfg.name == "sasrec":
        return SASRec(cfg)
    return CAMMSR(cfg, num_categories, text_dim, image_dim)
