"""Model size and compute: parameter counts and FLOPs per sample, for sizing a run (exported by cammsr)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .base import SequentialRecommender
from .config import ModelConfig


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total", "trainable", and one entry per top-level child module}."""
    counts = {"total": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for name, child in model.named_children():
        counts[name] = sum(p.numel() for p in child.parameters())
    return counts


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's counter knows the GPU attention kernels only; without these the CPU count would miss attention.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)


def flops_per_sample(model: SequentialRecommender, num_items: int, num_categories: int = 0, text_dim: int = 0,
                     image_dim: int = 0, batch_size: int = 4, seq_len: int | None = None,
                     tokens_per_item: int = 32) -> dict[str, float]:
    """Matmul and attention FLOPs per sample (torch FlopCounterMode; elementwise ops are not counted).

    Measured on full-length random sequences in training mode, with interaction times for a model that reads them
    and `tokens_per_item` token / patch states per item for one that reads those (TAME):
      forward: sequence encoding incl. MSCL views; scoring: the full-catalogue logits (2 * N * M * d);
      train_step: forward + full-softmax loss + backward; candidate_projection: projecting the whole
      catalogue's features once, per batch (divide by the batch size to amortise it).
    """
    cfg: ModelConfig = model.cfg
    length = seq_len or cfg.max_seq_len
    device = next(model.parameters()).device
    tokens = (tokens_per_item,) if cfg.reads_tokens else ()
    inputs = _random_inputs(cfg, batch_size, length, num_categories, text_dim, image_dim, tokens, device)
    table = _random_table(cfg, num_items, text_dim, image_dim, tokens, device)
    was_training = model.training
    model.train()
    try:
        with _counter() as counter:
            output = model(**inputs)
        forward = counter.get_total_flops()
        with _counter() as counter:
            candidates = model.item_candidates(**table)
        projection = counter.get_total_flops()
        with _counter() as counter:
            output = model(**inputs)
            candidates = model.item_candidates(**table)
            targets = torch.randint(1, num_items + 1, (batch_size,) if cfg.sequence_mode == "prefix"
                                    else (batch_size, length), device=device)
            model.loss(output, targets, candidates=candidates).total.backward()
        train_step = counter.get_total_flops()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    positions = 1 if cfg.sequence_mode == "prefix" else length
    return {
        "forward": forward / batch_size,
        "scoring": 2.0 * num_items * candidates.shape[1] * candidates.shape[2] * positions,
        "train_step": (train_step - projection) / batch_size,
        "candidate_projection": float(projection),
    }


def _random_inputs(cfg, batch, length, num_categories, text_dim, image_dim, tokens, device) -> dict:
    inputs = {"item_seq": torch.ones(batch, length, dtype=torch.long, device=device),
              "seq_len": torch.full((batch,), length, device=device),
              "id_emb": torch.randn(batch, length, cfg.hidden_size, device=device)}
    if text_dim:
        inputs["text_feat"] = torch.randn(batch, length, *tokens, text_dim, device=device)
    if image_dim:
        inputs["image_feat"] = torch.randn(batch, length, *tokens, image_dim, device=device)
    if num_categories:
        inputs["cat_labels"] = (torch.rand(batch, length, num_categories, device=device) < 0.1).float()
        inputs["has_cat"] = torch.ones(batch, length, dtype=torch.bool, device=device)
    if cfg.needs_times:
        days = torch.arange(length, dtype=torch.float64, device=device) * 86400.0
        inputs["time_seq"] = days.expand(batch, -1).contiguous()
    return inputs


def _random_table(cfg, num_items, text_dim, image_dim, tokens, device) -> dict:
    table = {"id_rows": torch.randn(num_items + 1, cfg.hidden_size, device=device)}
    if text_dim:
        table["text_rows"] = torch.randn(num_items + 1, *tokens, text_dim, device=device)
    if image_dim:
        table["image_rows"] = torch.randn(num_items + 1, *tokens, image_dim, device=device)
    return table
