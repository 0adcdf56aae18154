"""Which parameters of a pretrained text/image encoder train with the recommender (`features.tune`, per modality with
`features.tune_text` / `features.tune_image`):

- `frozen`: none (the encoder stays outside the DeepSpeed engine, as in cached mode);
- `top_layers`: the last `features.tune_layers` transformer blocks, and the final layernorm after them where the
  architecture has one (DINOv2); embeddings, lower blocks and BERT's unused pooler stay frozen;
- `lora`: LoRA adapters (the `peft` library's `inject_adapter_in_model`) of rank `features.lora_rank` and scale
  `features.lora_alpha` on every attention projection (query/key/value, or q/k/v_proj); the backbone stays frozen;
- `side_adapter`: none of the encoder's own; a `cammsr.side_adapter.SideAdapter` per modality reads the frozen
  backbone's per-layer states (see train.media).

`trainable_names` says which parameter names a mode trains: the tests check that gradients reach exactly those.
"""

from __future__ import annotations

from torch import nn

TUNE_MODES = ("frozen", "top_layers", "lora", "side_adapter")
LORA_TARGETS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")


def tune_mode(features_cfg, modality: str) -> str:
    """The mode of `modality` ("text" | "image"): its own key when set, else features.tune."""
    own = getattr(features_cfg, f"tune_{modality}")
    return own or features_cfg.tune


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer blocks (BERT, ViT, DINOv2: `encoder.layer`)."""
    blocks = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no encoder.layer block list; top_layers/lora/side_adapter need a "
                         "BERT/ViT/DINOv2-style encoder")
    return blocks


def lora_target_names(model: nn.Module) -> list[str]:
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS]
    if not names:
        raise ValueError(f"{type(model).__name__}: no attention projection named one of {LORA_TARGETS} for LoRA")
    return names


def make_trainable(model: nn.Module, mode: str, tune_layers: int = 1, lora_rank: int = 8,
                   lora_alpha: float = 16.0) -> list[str]:
    """Set requires_grad on the parameters `mode` trains (adding LoRA adapters for `lora`); returns their names."""
    if mode not in TUNE_MODES:
        raise ValueError(f"tune mode {mode!r} is not one of {TUNE_MODES}")
    model.requires_grad_(False)
    if mode == "top_layers":
        blocks = transformer_blocks(model)
        if not 1 <= tune_layers <= len(blocks):
            raise ValueError(f"features.tune_layers={tune_layers}: the encoder has {len(blocks)} blocks")
        for block in blocks[len(blocks) - tune_layers:]:
            block.requires_grad_(True)
        final_norm = getattr(model, "layernorm", None)
        if isinstance(final_norm, nn.LayerNorm):
            final_norm.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                            target_modules=lora_target_names(model), bias="none")
        inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    return [name for name, param in model.named_parameters() if param.requires_grad]
