"""Building blocks shared by CAMMSR and SASRec: DyT, RecBole's post-LN and SASRec's pre-LN Transformer, masks, init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DyT(nn.Module):
    """Dynamic Tanh (Eq. 13): tanh(alpha * x), optionally with the DyT paper's elementwise gamma, beta."""

    def __init__(self, dim: int, alpha_init: float = 0.5, affine: bool = False):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.alpha * x)
        return y * self.weight + self.bias if self.affine else y


class StandardizingLinear(nn.Linear):
    """nn.Linear that may read standardised inputs, linear((x - mean) * inv_std), with the standardisation folded
    into its weights: x (W diag(inv_std))^T + (b - W diag(inv_std) mean), so that no standardised copy of a feature
    table is written at every step. Folded in fp32 whatever the autocast: the folded bias cancels the features'
    common direction, which bf16 would round away. Its own module, so that ZeRO-3 gathers the weight when it runs."""

    def forward(self, x: torch.Tensor, mean: torch.Tensor | None = None,
                inv_std: torch.Tensor | None = None) -> torch.Tensor:
        if mean is None:
            return super().forward(x)
        weight = self.weight.float() * inv_std
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), weight, self.bias.float() - weight @ mean)


def make_norm(dim: int, use_dyt: bool, eps: float, dyt_alpha_init: float, dyt_affine: bool) -> nn.Module:
    if use_dyt:
        return DyT(dim, dyt_alpha_init, dyt_affine)
    return nn.LayerNorm(dim, eps=eps)


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] validity -> [B, 1, L, L] bool, True where query i may attend key j (j <= i, j valid).

    Every query keeps key 0 whenever the sequence is non-empty, so no row is fully masked.
    """
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, :])[:, None]


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x; `query` (default x) replaces x in the queries only."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        if query is not None:
            w_q, b_q = self.qkv.weight[:hidden], self.qkv.bias[:hidden]
            q = F.linear(query, w_q, b_q).view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)
        dropout = self.attn_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(attended.transpose(1, 2).reshape(batch, length, hidden))


class TransformerBlock(nn.Module):
    """RecBole's TransformerLayer: post-LN attention and GELU feed-forward, dropout before each residual."""

    def __init__(self, hidden: int, heads: int, inner: int, hidden_dropout: float, attn_dropout: float,
                 norm_factory):
        super().__init__()
        self.attention = MultiHeadSelfAttention(hidden, heads, attn_dropout)
        self.attention_norm = norm_factory()
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.ffn_norm = norm_factory()
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class OriginalSASRecBlock(nn.Module):
    """The SASRec paper's block as its authors' code (and RecTools) run it: the query is LayerNorm(x) while keys
    and values read x, x = LN(x) + attention; then x + Dropout(FFN(LN(x))), a ReLU FFN with dropout inside."""

    def __init__(self, hidden: int, heads: int, inner: int, hidden_dropout: float, attn_dropout: float,
                 norm_factory):
        super().__init__()
        self.attention = MultiHeadSelfAttention(hidden, heads, attn_dropout)
        self.attention_norm = norm_factory()
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), nn.ReLU(), nn.Dropout(hidden_dropout),
                                 nn.Linear(inner, hidden))
        self.ffn_norm = norm_factory()
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = self.attention_norm(x)
        x = query + self.attention(x, mask, query=query)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


BLOCK_STYLES = {"recbole": TransformerBlock, "sasrec": OriginalSASRecBlock}


class SequenceEncoder(nn.Module):
    """Z = Transformer(Dropout(Norm(S))) (Eq. 12 with LayerNorm, Eq. 14 with DyT), causal and padding-masked.

    style "recbole": post-LN blocks after the input norm (RecBole's SASRec, the paper's encoder). "sasrec": the
    SASRec paper's own pre-LN blocks on Dropout(S), no input norm, a final LayerNorm (`final_norm`)."""

    def __init__(self, hidden: int, heads: int, layers: int, inner: int, hidden_dropout: float,
                 attn_dropout: float, input_norm: nn.Module, block_norm_factory, style: str = "recbole"):
        super().__init__()
        self.input_norm = input_norm if style == "recbole" else nn.Identity()
        self.input_dropout = nn.Dropout(hidden_dropout)
        self.blocks = nn.ModuleList(
            BLOCK_STYLES[style](hidden, heads, inner, hidden_dropout, attn_dropout, block_norm_factory)
            for _ in range(layers))
        self.final_norm = block_norm_factory() if style == "sasrec" else nn.Identity()

    def forward(self, sequence: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(self.input_norm(sequence))
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.final_norm(x)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], index [B] -> x[b, index[b]] as [B, D]."""
    return x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)


NORMAL_INIT_STD = 0.02  # RecBole's SASRec initializer_range


def initializer(method: str):
    """The weight initialiser of `init_method`: Xavier (the paper) or normal(0, 0.02) (RecBole's SASRec,
    initializer_range 0.02)."""
    if method == "normal":
        return lambda weight: nn.init.normal_(weight, mean=0.0, std=NORMAL_INIT_STD)
    return nn.init.xavier_normal_ if method == "xavier_normal" else nn.init.xavier_uniform_


def init_weights_(module: nn.Module, method: str = "xavier_normal") -> None:
    """`init_method` for every Linear/Embedding weight and expert tensor, zero biases, unit LayerNorm."""
    init = initializer(method)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            init(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif hasattr(sub, "reset_parameters_with"):
            sub.reset_parameters_with(init)


@torch.no_grad()
def init_id_table_(weight: torch.Tensor, method: str = "xavier_normal") -> None:
    """Initialise an item-ID table that lives outside the model (row 0 = padding, kept at zero)."""
    initializer(method)(weight)
    weight[0].zero_()


@torch.no_grad()
def init_table_rows_(rows: torch.Tensor, method: str, table_shape: tuple[int, int], generator: torch.Generator) -> None:
    """`initializer(method)` on a block of rows of a table of `table_shape`, drawn from `generator`: Xavier's fans
    are the whole table's (fan_in = dim, fan_out = rows), so consecutive blocks draw what the whole table would."""
    if method == "normal":
        rows.normal_(0.0, NORMAL_INIT_STD, generator=generator)
        return
    std = math.sqrt(2.0 / sum(table_shape))
    if method == "xavier_normal":
        rows.normal_(0.0, std, generator=generator)
    else:
        rows.uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator=generator)
