"""Model settings: one flat dataclass whose field names are the public config keys.

Defaults are the paper's Section V-A values where it gives them; every ambiguity listed in
docs/MODEL_NOTES.md is a named field whose literal reading is one of the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("id", "text", "image")

_CHOICES = {
    "name": ("cammsr", "sasrec"),
    "sequence_mode": ("prefix", "all_positions"),
    "moe_variant": ("camoe", "cmoe", "moe"),
    "router": ("attentive", "linear"),
    "router_normalize": ("none", "softmax"),
    "category_weight_sign": ("positive", "negative"),
    "category_bce_reduction": ("sum", "mean"),
    "category_pooling": ("max", "mean", "min"),
    "mscl_reduction": ("mean", "sum"),
    "mscl_pair_reduction": ("sum", "mean"),
    "mscl_anchors": ("last", "every_prefix"),
    "loss_type": ("full_softmax", "sampled_softmax", "gbce"),
    "init_method": ("xavier_normal", "xavier_uniform", "normal"),
    "block_style": ("recbole", "sasrec"),
    "position_from": ("start", "end"),
    "feature_normalization": ("none", "standardize"),
}

# Paper ablations (Sections V-C, V-E, Table IV, Fig. 6) as overrides of the default config.
ABLATIONS: dict[str, dict] = {
    "w/o Att": {"router": "linear"},
    "w/o CG": {"use_category_guidance": False},
    "w/o DyT": {"use_dyt": False},
    "r CMoE": {"moe_variant": "cmoe", "router": "linear"},
    "r MoE": {"moe_variant": "moe", "router": "linear"},
    "w/o T": {"modalities": ("id", "image"), "mscl_pairs": (("id", "image"),)},
    "w/o V": {"modalities": ("id", "text"), "mscl_pairs": (("id", "text"),)},
    "w/o MSCL": {"mscl_pairs": ()},
}


@dataclass
class ModelConfig:
    """All model settings. `ModelConfig(**yaml_dict)` validates on construction.

    Architecture (V-A): hidden_size d, max_seq_len, num_layers, num_heads, ffn_inner_size (RecBole's
    inner_size, 4d). Dropouts and layer_norm_eps are RecBole's SASRec defaults (the paper does not state them).

    Ambiguities (MODEL_NOTES.md), literal reading first in each comment.
    """

    # "cammsr" | "sasrec" (ID-only baseline: uses the Transformer fields, sequence_mode, loss_type and
    # score_chunk_size; the multimodal fields are ignored).
    name: str = "cammsr"
    hidden_size: int = 64
    max_seq_len: int = 50
    num_layers: int = 2
    num_heads: int = 2
    ffn_inner_size: int = 256
    hidden_dropout: float = 0.5  # RecBole hidden_dropout_prob default
    attn_dropout: float = 0.5  # RecBole attn_dropout_prob default
    layer_norm_eps: float = 1e-12  # RecBole default
    # paper: "Xavier initialization with default parameters"; "normal": N(0, 0.02) (RecBole's SASRec)
    init_method: str = "xavier_normal"
    # SASRec only. block_style "recbole": RecBole's post-LN GELU blocks (the paper's SASRec row); "sasrec": the
    # SASRec paper's own pre-LN ReLU blocks with a final LayerNorm (RecTools' SASRec, the public benchmark's).
    # position_from "start": positions count from the first item; "end": back from the latest (RecTools).
    block_style: str = "recbole"
    position_from: str = "start"

    # "prefix": each sample is a prefix, read at seq_len - 1 (RecBole). "all_positions": every position
    # predicts its next item in one pass; needs every part causal (see router_causal).
    sequence_mode: str = "prefix"

    # Modalities used (w/o T, w/o V drop one); "id" is always looked up by the trainer.
    modalities: tuple[str, ...] = MODALITIES

    # Frozen features before Eq. 4's projection. "none": as extracted (literal). "standardize": each dimension
    # z-scored with the catalogue's statistics (fixed buffers, saved with the model). Encoder outputs share a
    # large common direction (DINOv2: mean norm 40 of 46), which at Xavier scale makes every projected item
    # nearly the same vector with a huge norm.
    feature_normalization: str = "standardize"

    # CAMoE (Eq. 5-7).
    num_experts: int = 4  # K; paper's best of {1, 2, 4, 8, 16}
    expert_hidden_multiplier: int = 4  # experts are 3d -> 4d -> d
    # "camoe": per-modality experts over the concatenated modalities (paper). "cmoe": M3SRec-style
    # cross-modal MoE, one expert pool shared by all modalities, each reading its own modality (r CMoE).
    # "moe": vanilla per-modality MoE, experts read only their own modality (r MoE).
    moe_variant: str = "camoe"
    # "attentive": Eq. 6-7, attention over sequence positions (literal). "linear": per-item softmax gate
    # (HM4SR's gate; the paper's "w/o Att").
    router: str = "attentive"
    # Attentive router output: "none" uses G as expert weights as written (literal); "softmax" normalises G over
    # experts, so the expert mixture of Eq. 11 is a convex one. Chosen on validation NDCG@10 (BENCHMARKS.md):
    # Beauty 0.0556 vs 0.0523, the quickstart data 0.1665 vs 0.1634.
    router_normalize: str = "softmax"
    router_causal: bool = False  # attentive router sees only positions <= the query; required by all_positions

    # Category guidance (Eq. 8-11).
    use_category_guidance: bool = True  # False = "w/o CG": equal modality weights
    category_weight_sign: str = "positive"  # softmax(+d) as written; "negative" = softmax(-d)
    # Eq. 9 sums BCE over classes ("sum", literal). "mean" averages over a level's classes, which keeps the
    # softmax over modalities from saturating when a level has hundreds of classes and makes levels of
    # different sizes comparable before pooling.
    category_bce_reduction: str = "mean"
    category_pooling: str = "max"  # pooling of per-level differences (Section V-K uses max)
    # Level (0 = top) of each category-vocabulary entry; None = one level. Length must equal num_categories.
    category_levels: list[int] | None = None
    detach_category_difference: bool = False  # literal: classifiers learn only through the gate
    aux_category_loss_weight: float = 0.0  # literal: no separate category loss (HM4SR trains one at 1.0)

    # DyT (Eq. 13-14).
    use_dyt: bool = True  # False = "w/o DyT": LayerNorm on the encoder input
    dyt_alpha_init: float = 0.5
    dyt_affine: bool = False  # literal tanh(alpha x); True adds the DyT paper's gamma * ... + beta
    dyt_in_blocks: bool = False  # literal: only the input LayerNorm is replaced; True replaces the block LNs too

    # Scoring (Eq. 15). False: candidates are the projected features x (HM4SR). True: literal e = x + p with
    # p the position the target would take; that adds one constant per user, so CE and ranks are unchanged.
    score_with_position: bool = False

    # Modality-swap contrastive learning (Eq. 16-18, 20).
    mscl_pairs: tuple[tuple[str, str], ...] = (("text", "image"), ("id", "text"), ("id", "image"))
    mscl_weight: float = 0.25  # lambda
    mscl_swap_prob: float = 0.5
    mscl_temperature: float = 1.0  # none written: tau = 1
    mscl_bidirectional: bool = False  # Eq. 18 is one-directional (m1 -> m2)
    mscl_reduction: str = "mean"  # Eq. 18 sums over the batch ("sum"); "mean" matches the per-sample CE scale
    # Eq. 20 weighs one L_MSCL by lambda, Table IV trains with one to three pairs: literal, the pairs' InfoNCE
    # summed ("sum", three pairs pull three times as hard as one); "mean" averages them.
    mscl_pair_reduction: str = "sum"
    # The paper's batch is 1024 prefixes, each an InfoNCE anchor. all_positions packs a user's prefixes into
    # windows: "last" contrasts each window's last position only (one anchor per window: ~20 per step of 1024
    # targets when windows are long); "every_prefix" every position, a window's other prefixes left out of its
    # negatives. Prefix mode has one prefix per row: "last" is the paper's batch there.
    mscl_anchors: str = "last"

    # Recommendation loss (Eq. 19): full softmax over all items; or, with negatives drawn by the trainer
    # (train.num_negatives, train.negative_sharing), sampled softmax with logQ correction, or gBCE (gSASRec's
    # generalised BCE, calibration gbce_t: 0 = plain BCE, 1 = fully calibrated; gSASRec's default 0.75).
    loss_type: str = "full_softmax"
    gbce_t: float = 0.75
    score_chunk_size: int = 65536  # items per chunk when scoring the catalogue

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.mscl_pairs = tuple(tuple(pair) for pair in self.mscl_pairs)
        if self.category_levels is not None:
            self.category_levels = [int(level) for level in self.category_levels]
        self.validate()

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def mscl_pair_share(self) -> float:
        """Each pair's share of L_MSCL (Eq. 20): 1 when the pairs' losses are summed, 1/#pairs when averaged."""
        if self.mscl_pair_reduction == "mean" and self.mscl_pairs:
            return 1.0 / len(self.mscl_pairs)
        return 1.0

    def validate(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                _fail(name, value, f"must be one of {allowed}")
        for name in ("hidden_size", "max_seq_len", "num_layers", "num_heads", "ffn_inner_size",
                     "num_experts", "expert_hidden_multiplier", "score_chunk_size"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if self.name != "sasrec":
            for name, default in (("block_style", "recbole"), ("position_from", "start")):
                if getattr(self, name) != default:
                    _fail(name, getattr(self, name), f"is a SASRec option (model.name='sasrec'); CAMMSR uses "
                                                     f"{default!r}")
        if self.hidden_size % self.num_heads:
            _fail("num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        for name in ("hidden_dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(name, getattr(self, name), "must be in [0, 1)")
        if not 0.0 <= self.gbce_t <= 1.0:
            _fail("gbce_t", self.gbce_t, "must be in [0, 1]")
        if not 0.0 <= self.mscl_swap_prob <= 1.0:
            _fail("mscl_swap_prob", self.mscl_swap_prob, "must be in [0, 1]")
        for name in ("mscl_temperature", "dyt_alpha_init", "layer_norm_eps"):
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be > 0")
        for name in ("mscl_weight", "aux_category_loss_weight"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            _fail("modalities", self.modalities, "must be a non-empty list without repeats")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            _fail("modalities", self.modalities, f"unknown {sorted(unknown)}; known {MODALITIES}")
        for pair in self.mscl_pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(self.modalities):
                _fail("mscl_pairs", self.mscl_pairs,
                      f"each pair must be two different enabled modalities {self.modalities}")
        if len({frozenset(pair) for pair in self.mscl_pairs}) != len(self.mscl_pairs):
            _fail("mscl_pairs", self.mscl_pairs, "pairs must not repeat")
        if self.sequence_mode == "all_positions" and self.router == "attentive" and not self.router_causal:
            _fail("router_causal", self.router_causal,
                  "sequence_mode='all_positions' with router='attentive' leaks the future unless router_causal")
        if self.mscl_anchors == "every_prefix" and self.sequence_mode != "all_positions":
            _fail("mscl_anchors", self.mscl_anchors, "'every_prefix' needs sequence_mode='all_positions'")
        if self.category_levels is not None and (not self.category_levels or min(self.category_levels) < 0):
            _fail("category_levels", self.category_levels, "must be non-empty with levels >= 0")


def _fail(name: str, value, reason: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r}: {reason}")
