"""CAMMSR model package: pure nn.Modules, scoring and ranking metrics (no devices, paths or process groups)."""

from .base import LossTerms, ModelOutput, SampledCandidates, SequentialRecommender
from .cammsr_model import CAMMSR
from .config import ABLATIONS, MODALITIES, ModelConfig
from .factory import build_model
from .layers import init_id_table_
from .metrics import ranking_metric_sums, sums_to_means
from .profile import flops_per_sample, parameter_counts
from .sasrec import SASRec

__all__ = [
    "ABLATIONS", "CAMMSR", "MODALITIES", "LossTerms", "ModelConfig", "ModelOutput", "SASRec",
    "SampledCandidates", "SequentialRecommender", "build_model", "flops_per_sample", "init_id_table_",
    "parameter_counts", "ranking_metric_sums", "sums_to_means",
]
