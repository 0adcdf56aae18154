"""build_model: the one place that maps a ModelConfig to a model class."""

from __future__ import annotations

from .base import SequentialRecommender
from .cammsr_model import CAMMSR
from .config import ModelConfig
from .findrec import FindRec
from .hm4sr import HM4SR
from .sasrec import SASRec
from .tame import TAME


def build_model(cfg: ModelConfig, num_categories: int = 0, text_dim: int = 0,
                image_dim: int = 0) -> SequentialRecommender:
    if cfg.name == "sasrec":
        return SASRec(cfg)
    if cfg.name == "hm4sr":
        return HM4SR(cfg, num_categories, text_dim, image_dim)
    if cfg.name == "findrec":
        return FindRec(cfg, text_dim, image_dim)
    if cfg.name == "tame":
        return TAME(cfg, text_dim, image_dim)
    return CAMMSR(cfg, num_categories, text_dim, image_dim)
