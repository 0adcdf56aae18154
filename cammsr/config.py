"""Model settings: one flat dataclass whose field names are the public config keys.

Defaults are the paper's Section V-A values where it gives them; every ambiguity listed in
docs/MODEL_NOTES.md is a named field whose literal reading is one of the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("id", "text", "image")
MAX_SCORE_CHUNK = 1 << 24  # rankings count a chunk's higher-scoring items as fp32 sums of 0/1, exact up to 2**24

_CHOICES = {
    "name": ("cammsr", "sasrec", "hm4sr", "findrec", "tame"),
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
    "findrec_modality_encoder": ("mamba", "mlp"),
    "findrec_cross_attention": ("causal_sequence", "single_key"),
    "findrec_iicm_direction": ("align", "as_written"),
    "findrec_iicm_anchors": ("last", "every_position"),
    "findrec_bandwidth": ("median", "svgd"),
    "findrec_candidates": ("fused", "id"),
    "hm4sr_cp_reduction": ("mean", "sum"),
    "tame_cross_attention_width": ("hidden", "feature"),
    "tame_aggregation_gate": ("linear", "softmax"),
    "tame_candidate_id": ("raw", "enriched"),
}
HM4SR_TIME_INPUTS = ("interval", "absolute")

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
    score_chunk_size: int = 65536  # items per chunk when scoring the catalogue (<= MAX_SCORE_CHUNK)

    # HM4SR (model.name=hm4sr, cammsr/hm4sr.py; its docstring maps the paper's equations and ambiguities). It also
    # reads hidden_size, max_seq_len, num_layers, num_heads, ffn_inner_size, the dropouts, modalities,
    # feature_normalization, loss_type and init_method. Weights of 0 switch a task off (the paper's -CP, -IDCL, -PCL).
    hm4sr_interactive_moe: bool = True  # False = "-IMoE"
    hm4sr_temporal_moe: bool = True  # False = "-TMoE" (PCL goes with it, as in the paper's ablation)
    hm4sr_interactive_experts: int = 4  # k_1
    hm4sr_temporal_experts: int = 4  # k_2
    hm4sr_alpha_init: float = 1.0  # alpha_m of Eq. 8 at the start
    hm4sr_time_inputs: tuple[str, ...] = HM4SR_TIME_INPUTS  # the Temporal MoE router's inputs (Fig. 5 variants)
    hm4sr_time_unit_s: float = 86400.0  # timestamps are read in this unit (a day)
    hm4sr_interval_scale: float = 100.0  # mu of Eq. 12
    hm4sr_max_interval: float = 3650.0  # longer intervals (in time units) share the last interval bucket
    hm4sr_time_freq: float = 10000.0  # freq of Eq. 13
    hm4sr_cp_weight: float = 1.0  # lambda_1
    hm4sr_cp_reduction: str = "mean"  # "sum": Eq. 22 literally (over classes and a sequence's items)
    hm4sr_idcl_weight: float = 0.5  # lambda_2
    hm4sr_idcl_temperature: float = 0.5  # tau
    hm4sr_pcl_weight: float = 0.5  # lambda_3
    hm4sr_pcl_ratio: float = 0.3  # beta
    hm4sr_pcl_temperature: float = 1.0  # Eq. 25 has none

    # FindRec (model.name=findrec, cammsr/findrec.py; its docstring maps Section 2's equations and ambiguities).
    # Defaults from the paper's Section 3.3 / Tables 6-9 where given. It also reads hidden_size (d), ffn_inner_size
    # (the FFNs), layer_norm_eps, feature_normalization, init_method, sequence_mode and the loss fields; it needs
    # all three modalities.
    findrec_num_layers: int = 2  # Mamba layers (Table 7)
    findrec_state_size: int = 16  # N, the SSM state size (Sec 3.3)
    findrec_expand: int = 2  # Mamba's expansion factor E (Sec 3.3)
    findrec_conv_width: int = 4  # Mamba's causal depthwise convolution (not stated: Mamba's default)
    # Fig. 1's "Mamba-FFN": a pre-LN FFN after each Mamba residual. False: Sec 2.1's x_{l+1} = x_l + alpha *
    # Mamba(LN(x_l)) alone.
    findrec_layer_ffn: bool = True
    findrec_dropout: float = 0.2  # "0.2 for the base model and feature fusion layers" (Sec 3.3)
    # The text/image branches: "mamba", a Mamba stack of their own like the ID branch; "mlp", a per-item FFN (no
    # sequence context before the cross-attention).
    findrec_modality_encoder: str = "mamba"
    findrec_num_heads: int = 8  # H subspaces of the cross-attention (Table 9)
    # "causal_sequence": each position's image sub-vector attends over the text sub-vectors of positions <= it;
    # "single_key": as written, one text vector per image vector, so the softmax is 1 and O^h = z_img^h + z_txt^h.
    findrec_cross_attention: str = "causal_sequence"
    findrec_num_experts: int = 4  # N_e (Fig. 3)
    findrec_expert_multiplier: int = 4  # experts d_h -> multiplier * d_h -> d_h (not stated)
    findrec_iicm_weight: float = 1e-3  # lambda of Eq. 5 (Table 6); 0 = "w/o IICM"
    findrec_entropy_weight: float = 1.0  # the Stein entropy regulariser's weight inside L_IICM (not stated)
    # "align": L_IICM = 1 - E[K] (the text: the modalities converge); "as_written": Eq. 2's +E[K], which pushes them
    # apart when minimised.
    findrec_iicm_direction: str = "align"
    findrec_iicm_normalize: bool = True  # IICM on L2-normalised z (the entropy of raw vectors grows with their norm)
    # IICM rows: "last", each row's last valid position (prefix mode: the paper's batch); "every_position", every
    # valid position (all_positions windows).
    findrec_iicm_anchors: str = "last"
    findrec_bandwidth: str = "median"  # 2 sigma^2 = 2 med^2 (Gretton); "svgd": med^2 / log(n + 1) (Liu & Wang)
    findrec_stein_eta: float = 0.01  # ridge eta of the Stein gradient estimator's (K + eta I)^-1
    # What S (Eq. 4) is scored against: "fused", Sec 2.1's e_fused = (e_id, e_txt, e_img) with S one d-vector per
    # modality; "id", the ID table alone (Mamba4Rec's tied scoring).
    findrec_candidates: str = "fused"

    # TAME (model.name=tame, cammsr/tame.py; its docstring maps Section IV's equations and ambiguities). Defaults from
    # the paper's V-A-4 / V-D grids {1, 2, 4, 8, 16}. It also reads hidden_size, max_seq_len, num_layers, num_heads,
    # ffn_inner_size (the retriever's FFN too), the dropouts, layer_norm_eps, modalities ("id" and one or both of
    # text / image), feature_normalization (over non-padding tokens), init_method and the loss fields.
    tame_text_queries: int = 2  # N_q^t: best at 1 and 2 (Fig. 2); with 1, Eq. 8 has nothing to weigh
    tame_image_queries: int = 4  # N_q^v: best at 4 (Fig. 3)
    tame_text_heads: int = 8  # h^t: gains up to 8, flat or lower at 16 (Fig. 4)
    tame_image_heads: int = 8  # h^v: gains up to 8, a plateau beyond (Fig. 5)
    tame_use_retriever: bool = True  # False = "w/o modality retriever": an MLP on the [CLS] token instead
    tame_use_id_enrichment: bool = True  # False = "w/o ID enrichment": x^id = e^id + p
    tame_cl_weight: float = 1.0  # Eq. 17 (0 = no L_CL)
    tame_cl_temperature: float = 1.0  # tau of Eq. 16: none written, 1 like mscl_temperature
    # Eq. 5's attention width: "hidden", keys/values projected to d (the queries' d_h = d/h per head); "feature",
    # queries projected to the features' d^t (d^t/h per head, as W^{c,K} is written; the heads must divide d^t).
    tame_cross_attention_width: str = "hidden"
    # Eq. 8: "linear" as written; "softmax" (default) normalises the gate over the N_q vectors. The retrieved vectors
    # leave a LayerNorm (norm ~sqrt(d)), and the literal linear gate scales their sum further: on the quickstart
    # data it started the full-softmax CE at 52 (ln N = 7.6) and reached valid NDCG@10 0.033 after 2 epochs,
    # the softmax gate 15 and 0.065 (cammsr train --config configs/quickstart.yaml model.name=tame max_epochs=2).
    tame_aggregation_gate: str = "softmax"
    # Eq. 14's ID candidate: "raw" e_i^id as written; "enriched": Eq. 10 on e_i^id gated by its own retrieval.
    tame_candidate_id: str = "raw"
    tame_item_chunk_size: int = 2048  # items per retriever pass (item_candidates, the statistics of the tokens)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.mscl_pairs = tuple(tuple(pair) for pair in self.mscl_pairs)
        self.hm4sr_time_inputs = tuple(self.hm4sr_time_inputs)
        if self.category_levels is not None:
            self.category_levels = [int(level) for level in self.category_levels]
        self.validate()

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def used_modalities(self) -> set[str]:
        """The modalities the model reads: SASRec reads the item IDs alone, the multimodal models `modalities`."""
        return {"id"} if self.name == "sasrec" else set(self.modalities)

    @property
    def reads_tokens(self) -> bool:
        """Whether the model reads token / patch states (TAME's retriever) instead of pooled feature vectors."""
        return self.name == "tame"

    @property
    def needs_times(self) -> bool:
        """Whether the model reads the interaction timestamps (HM4SR's Temporal MoE)."""
        return self.name == "hm4sr" and self.hm4sr_temporal_moe

    @property
    def reads_categories(self) -> bool:
        """Whether the model reads item category labels (CAMMSR's guidance, HM4SR's category prediction)."""
        if self.name == "cammsr":
            return self.use_category_guidance
        if self.name == "hm4sr":
            return self.hm4sr_cp_weight > 0
        return False

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
        if self.score_chunk_size > MAX_SCORE_CHUNK:
            _fail("score_chunk_size", self.score_chunk_size, f"must be <= {MAX_SCORE_CHUNK:,}")
        if self.name != "sasrec":
            for name, default in (("block_style", "recbole"), ("position_from", "start")):
                if getattr(self, name) != default:
                    _fail(name, getattr(self, name), f"is a SASRec option (model.name='sasrec'); "
                                                     f"{self.name} uses {default!r}")
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
        if self.name == "cammsr":
            self._validate_cammsr()
        if self.name == "hm4sr":
            self._validate_hm4sr()
        if self.name == "findrec":
            self._validate_findrec()
        if self.name == "tame":
            self._validate_tame()

    def _validate_hm4sr(self) -> None:
        if "id" not in self.modalities:
            _fail("modalities", self.modalities, "HM4SR needs the 'id' modality (its IDCL task and ID logits)")
        for name in ("hm4sr_interactive_experts", "hm4sr_temporal_experts"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if not self.hm4sr_time_inputs or not set(self.hm4sr_time_inputs) <= set(HM4SR_TIME_INPUTS) or \
                len(set(self.hm4sr_time_inputs)) != len(self.hm4sr_time_inputs):
            _fail("hm4sr_time_inputs", self.hm4sr_time_inputs, f"a non-empty subset of {HM4SR_TIME_INPUTS}")
        for name in ("hm4sr_time_unit_s", "hm4sr_interval_scale", "hm4sr_max_interval", "hm4sr_time_freq",
                     "hm4sr_idcl_temperature", "hm4sr_pcl_temperature"):
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be > 0")
        for name in ("hm4sr_cp_weight", "hm4sr_idcl_weight", "hm4sr_pcl_weight"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0")
        if not 0.0 <= self.hm4sr_pcl_ratio <= 1.0:
            _fail("hm4sr_pcl_ratio", self.hm4sr_pcl_ratio, "must be in [0, 1]")

    def _validate_findrec(self) -> None:
        if set(self.modalities) != set(MODALITIES):
            _fail("modalities", self.modalities, f"FindRec reads all of {MODALITIES} (its IICM aligns text and image)")
        for name in ("findrec_num_layers", "findrec_state_size", "findrec_expand", "findrec_conv_width",
                     "findrec_num_heads", "findrec_num_experts", "findrec_expert_multiplier"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if self.hidden_size % self.findrec_num_heads:
            _fail("findrec_num_heads", self.findrec_num_heads, f"must divide hidden_size={self.hidden_size}")
        if not 0.0 <= self.findrec_dropout < 1.0:
            _fail("findrec_dropout", self.findrec_dropout, "must be in [0, 1)")
        for name in ("findrec_iicm_weight", "findrec_entropy_weight"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be >= 0")
        if self.findrec_stein_eta <= 0:
            _fail("findrec_stein_eta", self.findrec_stein_eta, "must be > 0")

    def _validate_tame(self) -> None:
        if "id" not in self.modalities or not set(self.modalities) & {"text", "image"}:
            _fail("modalities", self.modalities, "TAME needs 'id' (its queries and enrichment) and text and/or image")
        for name in ("tame_text_queries", "tame_image_queries", "tame_text_heads", "tame_image_heads",
                     "tame_item_chunk_size"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        for name in ("tame_text_heads", "tame_image_heads"):
            if self.hidden_size % getattr(self, name):
                _fail(name, getattr(self, name), f"must divide hidden_size={self.hidden_size} (Eq. 3's d/h)")
        if self.tame_cl_weight < 0:
            _fail("tame_cl_weight", self.tame_cl_weight, "must be >= 0")
        if self.tame_cl_temperature <= 0:
            _fail("tame_cl_temperature", self.tame_cl_temperature, "must be > 0")
        if self.tame_candidate_id == "enriched" and not self.tame_use_id_enrichment:
            _fail("tame_candidate_id", self.tame_candidate_id, "needs tame_use_id_enrichment (the Eq. 10 it applies)")

    def _validate_cammsr(self) -> None:
        """CAMMSR's own fields (MSCL, router, categories): the other models do not read them."""
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
