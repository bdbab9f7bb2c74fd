"""Optimizers. ``build_optimizer`` is the single entry point the trainer uses."""

import torch
from torch import nn

from pretrain.config import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over the model's parameter groups (no decay on norms).

    The learning rate is set by the trainer every step from ``pretrain.schedules.lr_at``.
    """
    groups = model.param_groups(cfg.weight_decay)
    if cfg.name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"]) or None
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    raise ValueError(f"optim.name={cfg.name!r} has no implementation")
