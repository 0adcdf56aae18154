"""FindRec (Wang et al., KDD 2025, Section 2): a Mamba ID encoder, text/image branches aligned by the Stein-based
IICM, cross-modal attention with expert routing, concatenation + FFN fusion.

Equation -> code (the fields are ModelConfig's `findrec_*`):

  Sec 2.1  e_id = ItemEmbedding(v)                 `id_emb`, looked up by the trainer
           e_txt = W_txt f_text(t), e_img = ...    `ItemRepresentation.project` (frozen pooled features, optionally
                                                   standardised with the catalogue's statistics)
           e_fused = Concat(e_id, e_txt, e_img)    the candidates with findrec_candidates="fused"
           x_{l+1} = x_l + alpha Mamba(LN(x_l))    `MambaLayer` (alpha learnable, one per layer, starts at 1; dropout
                                                   on the Mamba output), + a pre-LN FFN residual with findrec_layer_ffn
           x^ = Delta f_Delta(x) + f_B(x),         `MambaMixer` + `selective_scan`: Mamba's S6 (Gu & Dao 2023), which
           h_t = SSM(x^), y = h_t f_D(x)           is what these lines summarise: input-dependent Delta (f_Delta),
                                                   B (f_B) and C, a causal depthwise conv, h_t = exp(Delta_t A) h_{t-1}
                                                   + Delta_t B_t u_t, y_t = C_t h_t + D u_t, gated by SiLU of a
                                                   second branch (f_D)
           z_ID = MambaLayer(L^(embed))            `id_encoder` on the ID sequence, then a final LayerNorm
  Fig. 1   "modality-specific encoders"           `text_encoder`, `image_encoder` (findrec_modality_encoder)
  Sec 2.2  z_img,last, z_txt,last                  the branches' outputs at each row's last position (or at every
                                                   position, findrec_iicm_anchors)
  Eq. 1    K = exp(-||z_img - z_txt||^2 / 2s^2)    `rbf_similarity`, s from `kernel_width` (findrec_bandwidth,
                                                   computed on the batch's image and text rows together, no gradient)
  Eq. 2    L_IICM = E[K]                           `IICM.loss`: 1 - E[K] (findrec_iicm_direction) minus
                                                   findrec_entropy_weight * (the Stein entropy surrogate of z_img
                                                   + that of z_txt); on the GLOBAL batch, a `BatchTerm`
           "Stein gradient estimator of            `stein_score`: Li & Turner's (ICLR 2018) kernel Stein gradient
           grad_z log q(z)" for the entropy        estimator, G = -(K + eta I)^-1 <grad, K> with the RBF kernel,
                                                   <grad, K>_i = sum_j grad_{x_j} k(x_i, x_j); `entropy_surrogate`
                                                   turns it into dH/dtheta = -E[G(z) . dz/dtheta] (a kernel
                                                   ridge estimate: consistent, not unbiased as the text claims)
  Sec 2.3  A^h = Softmax(z_img^h z_txt^h^T / sqrt(d_h)), O^h = z_img^h + A^h z_txt^h
                                                   `CrossModalRouting` (findrec_cross_attention), no projections
           E^h = sum_k g_k^h Expert_k(O^h)         per-head linear routers (softmax over experts) and one pool of
                                                   experts shared by the heads (camoe.LinearRouter and the "cmoe"
                                                   ModalityExperts with the heads as the routed axis)
           O_exp = Concat(E^1..E^H)                `CrossModalRouting.forward`'s flatten
  Eq. 3-4  S = FFN(Concat(z_ID, O_exp))            `fusion`: Linear(2d, ffn_inner_size), GELU, dropout, Linear to one
                                                   d-vector per candidate modality
  Eq. 5    L = L_rec + lambda L_IICM               `SequentialRecommender.loss` / the trainer add
                                                   findrec_iicm_weight * the IICM batch term

Ambiguities (reading chosen, why):

- Eq. 2's sign: minimising E[K] pushes the modalities apart while the text says the term aligns them; "align"
  minimises 1 - E[K] (same gradient as -E[K], a value in [0, 1]); "as_written" keeps +E[K].
- The entropy regulariser has no equation: H(z_img) + H(z_txt) are maximised, each modality's score estimated from
  its own rows of the batch (the text: "maximally increasing the differential entropy of the embeddings"); its
  weight is not given (1). The surrogate's VALUE is 0 (G . (z - stopgrad(z))): only its gradient is the estimate, so
  the logged IICM value is the alignment term.
- The entropy of unnormalised vectors grows without bound with their scale, so the IICM works on L2-normalised z
  (findrec_iicm_normalize; False: on z as is).
- Bandwidth "adaptively estimated": the median heuristic over the pairwise distances of the batch's image and text
  rows (Gretton's 2 s^2 = 2 med^2, or SVGD's med^2 / log(n + 1)); the lower median when the count is even.
- Cross-attention between two single vectors is a softmax over one element (A = 1): "causal_sequence" attends from
  each position's image sub-vector over the text sub-vectors of positions <= it (causal, padding masked);
  "single_key" is the literal one-key reading.
- Routers and experts: one router per head (d_h -> N_e, softmax), one pool of N_e experts (d_h -> multiplier * d_h
  -> d_h, GELU, findrec_expert_multiplier) shared by the heads, evaluated densely ("multi-head subspace
  decomposition"). The heads' gates are the output's expert_weights (groups head0..), logged by the trainer as
  cammsr/expert_usage/head<h>/expert<k>.
- "Modality-specific encoders" (Fig. 1 only): "mamba", each content branch has its own Mamba stack like the ID
  branch, so z_txt,last / z_img,last are sequence representations read at the last position as z_ID is; "mlp", a
  per-item FFN.
- The ID branch reads the ID embeddings alone ("z_ID"); e_fused, defined and never used again in the text, is what S
  is scored against ("fused": one d-vector of S per modality, score = sum_m S_m . e_m); "id" scores S against the ID
  table as Mamba4Rec does.
- No position embeddings: the Mamba recurrence is ordered by construction.
- Every part is causal (conv, scan, cross-attention), so sequence_mode="all_positions" needs no extra switch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import BatchTerm, ModelOutput, SequentialRecommender
from .camoe import LinearRouter, ModalityExperts
from .config import ModelConfig
from .item_representation import ItemRepresentation
from .layers import causal_padding_mask, gather_positions, init_weights_

# Mamba's initial step sizes: Delta drawn log-uniformly in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX = 1e-3, 1e-1


def selective_scan(u: torch.Tensor, delta: torch.Tensor, decay_rate: torch.Tensor, input_map: torch.Tensor,
                   output_map: torch.Tensor) -> torch.Tensor:
    """S6's recurrence, one step at a time over the sequence (causal by construction):

        h_t = exp(Delta_t A) * h_{t-1} + Delta_t B_t u_t,   y_t = C_t . h_t,   h_{-1} = 0

    u, delta [B, L, E]; decay_rate A [E, N] (negative); input_map B_t and output_map C_t [B, L, N] -> y [B, L, E].
    Zero-order hold for A and Euler for B, Mamba's discretisation. A loop of L small steps in fp32: mamba_ssm's fused
    scan needs CUDA kernels."""
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, input_map, output_map = u.float(), delta.float(), input_map.float(), output_map.float()
        decay = torch.exp(delta[..., None] * decay_rate.float())  # [B, L, E, N]
        drive = (delta * u)[..., None] * input_map[:, :, None, :]  # [B, L, E, N]
        state = torch.zeros_like(drive[:, 0])
        outputs = []
        for t in range(u.shape[1]):
            state = decay[:, t] * state + drive[:, t]
            outputs.append((state * output_map[:, t, None, :]).sum(-1))
        return torch.stack(outputs, dim=1)


class MambaMixer(nn.Module):
    """Mamba's block (S6): x -> (u, gate); u -> causal depthwise conv -> SiLU -> input-dependent Delta, B, C ->
    selective scan + D u; times SiLU(gate); projected back to d. [B, L, d] -> [B, L, d]."""

    def __init__(self, hidden: int, state_size: int, expand: int, conv_width: int):
        super().__init__()
        inner = expand * hidden
        self.state_size = state_size
        self.dt_rank = math.ceil(hidden / 16)  # Mamba's "auto" rank of the Delta projection
        self.in_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, conv_width, groups=inner, padding=conv_width - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=False)
        # Set here, not by init_weights_ (which sees Linear/Embedding/LayerNorm only): softplus(dt_bias) starts
        # log-uniform in [DT_MIN, DT_MAX]; A = -exp(log_decay_rate) starts at -(1..N) per channel; D at 1.
        step = torch.exp(torch.rand(inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        self.dt_bias = nn.Parameter(step + torch.log(-torch.expm1(-step)))  # inverse softplus
        self.log_decay_rate = nn.Parameter(torch.log(torch.arange(1, state_size + 1).float()).repeat(inner, 1))
        self.skip = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        # padding both ends by width - 1 and keeping the first L outputs: position t sees t - width + 1 .. t
        u = F.silu(self.conv(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, input_map, output_map = self.x_proj(u).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        delta = F.softplus(self.dt_proj(dt) + self.dt_bias)
        y = selective_scan(u, delta, -torch.exp(self.log_decay_rate), input_map, output_map).to(u.dtype)
        return self.out_proj((y + u * self.skip) * F.silu(gate))


def feed_forward(hidden: int, inner: int, dropout: float, out: int | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, out or hidden))


class MambaLayer(nn.Module):
    """x + alpha * Dropout(Mamba(LN(x))) (Sec 2.1), then x + Dropout(FFN(LN(x))) when `with_ffn`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mixer = MambaMixer(d, cfg.findrec_state_size, cfg.findrec_expand, cfg.findrec_conv_width)
        self.alpha = nn.Parameter(torch.ones(()))
        self.dropout = nn.Dropout(cfg.findrec_dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.findrec_layer_ffn else None
        self.ffn = feed_forward(d, cfg.ffn_inner_size, cfg.findrec_dropout) if cfg.findrec_layer_ffn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha * self.dropout(self.mixer(self.norm(x)))
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x


class MambaEncoder(nn.Module):
    """Dropout on the input sequence, findrec_num_layers Mamba layers, a final LayerNorm. [B, L, d] -> [B, L, d];
    causal: position t reads positions <= t only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_dropout = nn.Dropout(cfg.findrec_dropout)
        self.layers = nn.ModuleList(MambaLayer(cfg) for _ in range(cfg.findrec_num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(sequence)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)


def modality_encoder(cfg: ModelConfig) -> nn.Module:
    """A content branch: its own Mamba stack ("mamba") or a per-item FFN on the dropped-out input ("mlp")."""
    if cfg.findrec_modality_encoder == "mamba":
        return MambaEncoder(cfg)
    d = cfg.hidden_size
    return nn.Sequential(nn.Dropout(cfg.findrec_dropout), feed_forward(d, cfg.ffn_inner_size, cfg.findrec_dropout))


class CrossModalRouting(nn.Module):
    """Sec 2.3: per head h, O^h = z_img^h + A^h z_txt^h, then E^h = sum_k g_k^h Expert_k(O^h) and
    O_exp = Concat_h E^h. z_img, z_txt [B, L, d], valid [B, L] -> (O_exp [B, L, d], gates [B, L, H, K])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.findrec_num_heads
        self.attend_over_sequence = cfg.findrec_cross_attention == "causal_sequence"
        head_dim = cfg.hidden_size // self.heads
        self.router = LinearRouter(self.heads, head_dim, cfg.findrec_num_experts)
        self.experts = ModalityExperts("cmoe", self.heads, head_dim, cfg.findrec_num_experts,
                                       cfg.findrec_expert_multiplier)

    def forward(self, z_img: torch.Tensor, z_txt: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        image_heads = z_img.unflatten(-1, (self.heads, -1))  # [B, L, H, d_h]
        text_heads = z_txt.unflatten(-1, (self.heads, -1))
        if self.attend_over_sequence:
            attended = F.scaled_dot_product_attention(image_heads.transpose(1, 2), text_heads.transpose(1, 2),
                                                      text_heads.transpose(1, 2), attn_mask=causal_padding_mask(valid))
            attended = attended.transpose(1, 2)
        else:
            attended = text_heads  # a softmax over one key is 1
        mixed = image_heads + attended
        gates = self.router(mixed, valid)
        return self.experts(mixed, gates).flatten(-2), gates


def kernel_width(points: torch.Tensor, rule: str) -> torch.Tensor:
    """w = 2 s^2 of the RBF kernel exp(-||x - y||^2 / w) from the pairwise distances of `points` [n, d], n >= 2
    (pairs i < j; the lower median when their count is even): "median", s = the median distance (Gretton et al.);
    "svgd", w = median squared distance / log(n + 1) (Liu & Wang's SVGD code)."""
    squared = torch.pdist(points.detach()).square().median()
    width = 2 * squared if rule == "median" else squared / math.log(points.shape[0] + 1)
    return width.clamp_min(1e-12)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, d], [m, d] -> ||x_i - y_j||^2 as [n, m]."""
    return (x.square().sum(-1)[:, None] + y.square().sum(-1)[None, :] - 2 * x @ y.T).clamp_min(0)


def rbf_similarity(x: torch.Tensor, y: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Eq. 1 on paired rows: exp(-||x_i - y_i||^2 / w), [n]."""
    return torch.exp(-(x - y).square().sum(-1) / width)


@torch.no_grad()
def stein_score(samples: torch.Tensor, width: torch.Tensor, eta: float) -> torch.Tensor:
    """Li & Turner's kernel Stein gradient estimator of grad_x log q(x) at each of the samples [n, d] of q:
    G = -(K + eta I)^-1 <grad, K>, K_ij = exp(-||x_i - x_j||^2 / w), <grad, K>_i = sum_j grad_{x_j} k(x_i, x_j)
    = (2 / w) sum_j K_ij (x_i - x_j). From Stein's identity E_q[h(x) grad log q(x)^T + grad h(x)] = 0 with the
    kernel's features as h, solved by ridge regression. [n, d]."""
    kernel = torch.exp(-squared_distances(samples, samples) / width)
    kernel_gradient = 2 / width * (kernel.sum(1, keepdim=True) * samples - kernel @ samples)
    ridge = eta * torch.eye(samples.shape[0], dtype=samples.dtype, device=samples.device)
    return -torch.linalg.solve(kernel + ridge, kernel_gradient)


def entropy_surrogate(z: torch.Tensor, rule: str, eta: float) -> torch.Tensor:
    """A scalar whose gradient is the Stein estimate of dH(q)/dtheta for the rows z [n, d] = f_theta(noise) of q:
    dH/dtheta = -E[grad_z log q(z) . dz/dtheta] (the score term E[d log q_theta / d theta] vanishes). Its value is 0."""
    score = stein_score(z.detach(), kernel_width(z, rule), eta)
    return -(score * (z - z.detach())).sum(-1).mean()


@dataclass(frozen=True)
class IICM:
    """The Integrated Information Coordination loss (Eq. 1-2 + the Stein entropy regulariser) on the rows the
    trainer gathers from every rank: called as fn(tensors, real) of a BatchTerm."""

    direction: str
    bandwidth: str
    entropy_weight: float
    stein_eta: float
    normalize: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> IICM:
        return cls(cfg.findrec_iicm_direction, cfg.findrec_bandwidth, cfg.findrec_entropy_weight,
                   cfg.findrec_stein_eta, cfg.findrec_iicm_normalize)

    def loss(self, z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
        """z_img, z_txt [n, d], row i of each from the same anchor. Zero when n < 2 (no bandwidth to estimate)."""
        if z_img.shape[0] < 2:
            return z_img.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=z_img.device.type, enabled=False):
            img, txt = z_img.float(), z_txt.float()
            if self.normalize:
                img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
            similarity = rbf_similarity(img, txt, kernel_width(torch.cat([img, txt]), self.bandwidth)).mean()
            alignment = 1 - similarity if self.direction == "align" else similarity
            entropy = entropy_surrogate(img, self.bandwidth, self.stein_eta) + \
                entropy_surrogate(txt, self.bandwidth, self.stein_eta)
            return alignment - self.entropy_weight * entropy

    def __call__(self, tensors: tuple[torch.Tensor, ...], real: torch.Tensor) -> torch.Tensor:
        """(z_img, z_txt) [B, d] at each row's last position, or (z_img, z_txt, valid) [B, L, ...] at every position;
        real [B]: the batch's real rows."""
        if len(tensors) == 2:
            z_img, z_txt = tensors
            return self.loss(z_img[real], z_txt[real])
        z_img, z_txt, valid = tensors
        anchors = (valid > 0) & real[:, None]
        return self.loss(z_img[anchors], z_txt[anchors])


class FindRec(SequentialRecommender):
    """FindRec behind the project's interface (see the module docstring for the equations and readings)."""

    def __init__(self, cfg: ModelConfig, text_dim: int, image_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.items = ItemRepresentation(cfg, text_dim, image_dim, with_position=False)
        self.id_encoder = MambaEncoder(cfg)
        self.text_encoder = modality_encoder(cfg)
        self.image_encoder = modality_encoder(cfg)
        self.cross_modal = CrossModalRouting(cfg)
        self.scored_modalities = cfg.num_modalities if cfg.findrec_candidates == "fused" else 1
        self.fusion = feed_forward(2 * d, cfg.ffn_inner_size, cfg.findrec_dropout, self.scored_modalities * d)
        self.iicm = IICM.from_config(cfg)
        self._modality_index = {m: i for i, m in enumerate(cfg.modalities)}
        init_weights_(self, cfg.init_method)

    def fit_feature_statistics(self, text_table=None, image_table=None) -> None:
        self.items.fit_tables(text_table, image_table)

    def item_candidates(self, id_rows, text_rows=None, image_rows=None) -> torch.Tensor:
        """[N + 1, M, d]: e_fused's projected rows per modality ("fused") or the ID rows alone as [N + 1, 1, d]."""
        if self.cfg.findrec_candidates == "id":
            return id_rows[:, None, :]
        return self.items.project(id_rows, text_rows, image_rows)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor, id_emb: torch.Tensor,
                text_feat: torch.Tensor | None = None, image_feat: torch.Tensor | None = None,
                cat_labels=None, has_cat=None, time_seq=None) -> ModelOutput:
        """Categories and times are accepted and not used."""
        valid = item_seq != 0
        x = self.items.project(id_emb, text_feat, image_feat)  # [B, L, M, d]
        z_id = self.id_encoder(x[:, :, self._modality_index["id"]])
        z_txt = self.text_encoder(x[:, :, self._modality_index["text"]])
        z_img = self.image_encoder(x[:, :, self._modality_index["image"]])
        o_exp, gates = self.cross_modal(z_img, z_txt, valid)
        z_final = torch.cat([z_id, o_exp], dim=-1)  # Eq. 3
        if self.cfg.sequence_mode == "prefix":
            z_final = gather_positions(z_final, seq_len - 1)
        user = self.fusion(z_final).unflatten(-1, (self.scored_modalities, -1))  # Eq. 4
        terms = [self._iicm_term(z_img, z_txt, valid, seq_len)] if self.training and self.cfg.findrec_iicm_weight \
            else []
        return ModelOutput(user_vectors=user, valid=valid, batch_terms=terms, expert_weights=gates,
                           expert_groups=tuple(f"head{h}" for h in range(gates.shape[2])))

    def _iicm_term(self, z_img, z_txt, valid, seq_len) -> BatchTerm:
        weight = self.cfg.findrec_iicm_weight
        if self.cfg.findrec_iicm_anchors == "last":
            last = seq_len - 1
            return BatchTerm("iicm", weight, (gather_positions(z_img, last), gather_positions(z_txt, last)), self.iicm)
        return BatchTerm("iicm", weight, (z_img, z_txt, valid.to(z_img.dtype)), self.iicm, sequence_tensors=(0, 1, 2))
