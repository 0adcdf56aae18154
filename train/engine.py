"""The dense part of the model as a DeepSpeed engine: ZeRO stage, precision, client optimizer and schedule.

The optimizer is a client torch.optim optimizer (no C++ op to compile); the schedule is a LambdaLR stepped by the
engine. Gradient accumulation stays at 1: the fused sparse optimizer updates the ID table every micro-batch.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from train.config import TrainConfig
from train.trained_modules import RecommenderWithEncoders


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    micro = max(1, -(-train.batch_size // world_size))
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        "gradient_clipping": float(train.grad_clip),
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(train: TrainConfig, total_steps: int):
    """Multiplier of train.lr at a step: linear warmup, then constant / linear / cosine decay to min_lr_ratio."""
    warmup, floor = train.warmup_steps, train.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if train.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def client_optimizer(train: TrainConfig, params) -> torch.optim.Optimizer:
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for every tensor's update instead of a dozen ops per tensor (549 dispatches per CAMMSR
    # step on the CPU's default path), on CPU and CUDA alike; equal to the per-tensor update up to float rounding.
    return cls(params, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay,
               fused=True)


def _register_external_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when that module's forward runs. Parameters read directly by a parent
    (e.g. `self.position.weight`) are registered on the parent so they are gathered there too."""
    import deepspeed
    register_external_parameter = deepspeed.zero.register_external_parameter
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.Embedding):
                register_external_parameter(parent, child.weight)


def _lift_scalar_parameters(model: nn.Module) -> list[str]:
    """DeepSpeed 0.19.8 broadcasts parameters as `p.data.view(torch.uint8)`, which fails for 0-dim tensors (DyT's
    alpha). Such parameters become shape [1]; every use (`alpha * x`) broadcasts the same. Returns their names."""
    lifted = []
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.dim() == 0:
                module._parameters[name] = nn.Parameter(param.data.reshape(1), requires_grad=param.requires_grad)
                lifted.append(f"{module_name}.{name}")
    return lifted


def select_deepspeed_accelerator() -> None:
    """DeepSpeed picks its accelerator once, when first imported: CUDA where torch sees a GPU, else CPU. Call before
    that import; a DS_ACCELERATOR already in the environment wins."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def parameter_groups(model: nn.Module, features) -> list[dict]:
    """The recommender's parameters (train.lr, train.weight_decay) and, where encoders train with it, their trainable
    parameters as a group of their own (features.lr, features.weight_decay). Frozen parameters are in no group."""
    if not isinstance(model, RecommenderWithEncoders):
        return [{"params": list(model.parameters())}]
    encoders = [p for p in model.encoders.parameters() if p.requires_grad]
    return [{"params": list(model.recommender.parameters())},
            {"params": encoders, "lr": features.lr, "weight_decay": features.weight_decay}]


def build_engine(model: nn.Module, train: TrainConfig, world_size: int, total_steps: int, features=None):
    """`features` (the FeaturesConfig) is needed where `model` holds trained encoders."""
    select_deepspeed_accelerator()
    import deepspeed
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.abspath(".torch_extensions"))
    _lift_scalar_parameters(model)
    optimizer = client_optimizer(train, parameter_groups(model, features))
    schedule = lr_lambda(train, total_steps)
    if train.zero_stage == 3:
        _register_external_parameters(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train, world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), dist_init_required=False)
    if world_size == 1 and train.zero_stage == 0:
        # One process has nothing to average. The engine would still flatten every gradient, all-reduce it alone and
        # copy it back each step (~60 kernel ops); ZeRO >= 1 keeps that path, its optimizer fills its own buffers there.
        engine.enable_backward_allreduce = False
    return engine, scheduler


def backward_pass(engine, loss: torch.Tensor) -> None:
    """engine.backward(loss). Where a single ZeRO-0 process skips the gradient all-reduce (build_engine), also what
    that all-reduce does first: a zero gradient for each trainable parameter that got none (the ID warm-up leaves the
    content pathways without one), so that Adam steps them, and counts the step, as a multi-process run does."""
    engine.backward(loss)
    if not engine.enable_backward_allreduce:
        for param in engine.module.parameters():
            if param.requires_grad and param.grad is None and param.numel():
                param.grad = torch.zeros_like(param)


def compute_dtype(train: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if train.precision == "bf16" else torch.float32
