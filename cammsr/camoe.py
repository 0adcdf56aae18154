"""Category-guided attentive mixture of experts, the mixture part (Eq. 5-7) and its ablation variants."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import causal_padding_mask


class AttentiveRouter(nn.Module):
    """Eq. 6-7 for every modality at once: G^m = Softmax(Q K^T / sqrt(K)) V with Q, K, V = E_m W (W: d x K).

    The softmax runs over sequence positions (the literal reading): each item's K-vector of expert weights
    is an attention-weighted mix over the items of its sequence. Padding keys are masked; with `causal`,
    so are later positions.
    """

    def __init__(self, num_modalities: int, hidden: int, num_experts: int, normalize: str, causal: bool):
        super().__init__()
        self.num_experts = num_experts
        self.normalize = normalize
        self.causal = causal
        self.qkv = nn.Parameter(torch.empty(num_modalities, hidden, 3 * num_experts))

    def reset_parameters_with(self, init) -> None:
        for block in self.qkv.data.split(self.num_experts, dim=-1):
            for weight in block:
                init(weight)

    def forward(self, e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """e [B, L, M, d], valid [B, L] -> expert weights [B, L, M, K]."""
        q, k, v = torch.einsum("blmd,mdk->bmlk", e, self.qkv).split(self.num_experts, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.num_experts)  # [B, M, L, L]
        allowed = causal_padding_mask(valid) if self.causal else valid[:, None, None, :]
        # A finite fill keeps a fully masked row (an empty sequence) uniform instead of NaN.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        gates = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3)
        return gates.softmax(dim=-1) if self.normalize == "softmax" else gates


class LinearRouter(nn.Module):
    """Per-item gate, softmax over experts of a linear map of the item's own modality (the "w/o Att" router)."""

    def __init__(self, num_modalities: int, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_modalities, hidden, num_experts))
        self.bias = nn.Parameter(torch.zeros(num_modalities, num_experts))

    def reset_parameters_with(self, init) -> None:
        for weight in self.weight.data:
            init(weight)
        nn.init.zeros_(self.bias)

    def forward(self, e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return (torch.einsum("blmd,mdk->blmk", e, self.weight) + self.bias).softmax(dim=-1)


class ModalityExperts(nn.Module):
    """K FFN experts (in -> mult*d -> d, GELU) per modality, mixed by the router's weights.

    variant "camoe": each modality has its own experts reading the concatenation of all modalities (Eq. 5).
    variant "moe": each modality has its own experts reading only that modality (vanilla MoE, "r MoE").
    variant "cmoe": one expert pool shared across modalities, each modality routed separately over it and
    feeding its own representation ("r CMoE", after M3SRec's cross-modal MoE).
    All experts are evaluated densely with batched einsums; parameters are [pools, K, ...] tensors.
    """

    def __init__(self, variant: str, num_modalities: int, hidden: int, num_experts: int, multiplier: int):
        super().__init__()
        self.variant = variant
        self.num_modalities = num_modalities
        in_dim = num_modalities * hidden if variant == "camoe" else hidden
        pools = 1 if variant == "cmoe" else num_modalities
        inner = multiplier * hidden
        self.w1 = nn.Parameter(torch.empty(pools, num_experts, in_dim, inner))
        self.b1 = nn.Parameter(torch.zeros(pools, num_experts, inner))
        self.w2 = nn.Parameter(torch.empty(pools, num_experts, inner, hidden))
        self.b2 = nn.Parameter(torch.zeros(pools, num_experts, hidden))

    def reset_parameters_with(self, init) -> None:
        for weight in (*self.w1.data.flatten(0, 1), *self.w2.data.flatten(0, 1)):
            init(weight)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, e: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """e [..., M, d], gates [..., M, K] -> sum_k g_k Expert_k(input) as [..., M, d].

        Each (modality, expert) pair is one batch of a bmm over all tokens, [M*K, T, *]: the inner activations are
        never permuted, and the gates weight the d-wide expert outputs rather than the inner-wide activations
        (sum_k g_k (gelu(h_k) W2_k + b2_k), Eq. 5 as written); either step at [T, M, K, inner] cost more than the
        matmuls themselves.
        """
        modalities, experts = self.num_modalities, self.w1.shape[1]
        pairs = modalities * experts
        tokens = e.reshape(-1, modalities, e.shape[-1])  # [T, M, d]
        count = tokens.shape[0]
        if self.variant == "camoe":  # every expert of every modality reads the concatenation
            inputs = tokens.flatten(1)[None].expand(pairs, -1, -1)
        else:  # each modality's experts read that modality
            inputs = tokens.transpose(0, 1)[:, None].expand(-1, experts, -1, -1).reshape(pairs, count, -1)
        w1 = self.w1.expand(modalities, -1, -1, -1).reshape(pairs, *self.w1.shape[2:])
        b1 = self.b1.expand(modalities, -1, -1).reshape(pairs, 1, -1)
        w2 = self.w2.expand(modalities, -1, -1, -1).reshape(pairs, *self.w2.shape[2:])
        b2 = self.b2.expand(modalities, -1, -1).reshape(pairs, 1, -1)
        outputs = torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, inputs, w1)), w2)  # [M*K, T, d]
        mixed = torch.einsum("mktd,tmk->tmd", outputs.view(modalities, experts, count, -1),
                             gates.reshape(count, modalities, experts))
        return mixed.reshape(e.shape)


class MixtureOfExperts(nn.Module):
    """Router + experts: e [B, L, M, d] -> (e_hat [B, L, M, d], expert weights [B, L, M, K])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, d, k = cfg.num_modalities, cfg.hidden_size, cfg.num_experts
        if cfg.router == "attentive":
            self.router = AttentiveRouter(m, d, k, cfg.router_normalize, cfg.router_causal)
        else:
            self.router = LinearRouter(m, d, k)
        self.experts = ModalityExperts(cfg.moe_variant, m, d, k, cfg.expert_hidden_multiplier)

    def forward(self, e: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.router(e, valid)
        return self.experts(e, gates), gates
