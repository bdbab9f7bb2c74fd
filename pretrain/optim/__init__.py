"""Block-wise distributed optimizers. ``build_optimizer`` is the single entry point the trainer uses."""

import torch

from pretrain.config import OptimConfig
from pretrain.optim.adamw import AdamW
from pretrain.optim.base import BlockOptimizer, assign_owners, ownership_report
from pretrain.optim.galore import GaLore, dct_basis
from pretrain.optim.mlbfgs import MomentumLBFGS
from pretrain.optim.sgd import SGD

OPTIMIZERS = {cls.name: cls for cls in (AdamW, GaLore, MomentumLBFGS, SGD)}

__all__ = ["SGD", "AdamW", "BlockOptimizer", "GaLore", "MomentumLBFGS", "OPTIMIZERS", "assign_owners",
           "build_optimizer", "dct_basis", "ownership_report"]


def build_optimizer(cfg: OptimConfig, named_params, groups: list[dict], dp_group=None, tp_group=None, pp_group=None,
                    placements=None) -> BlockOptimizer:
    """The optimizer named by ``cfg.name`` over ``groups`` (dicts with ``params``, ``weight_decay`` and
    ``role``: matrix, embedding or norm), its blocks owned across ``dp_group``. mL-BFGS also reduces its block
    dot products over ``tp_group`` and its global norm over ``pp_group``; ``placements`` (name -> tensor-parallel
    split dim, None: replicated) says which tensors are shards.

    The learning rate is set by the trainer every step from ``pretrain.schedules.lr_at``.
    """
    if cfg.name == "adamw":
        return AdamW(named_params, groups, cfg.lr, cfg.betas, cfg.eps, dp_group)
    if cfg.name == "galore":
        g = cfg.galore
        roles = {"matrix", "embedding"} if g.embeddings else {"matrix"}
        groups = [{**grp, "galore": grp.get("role", "matrix") in roles} for grp in groups]
        return GaLore(named_params, groups, cfg.lr, g.rank, g.update_gap, g.scale, g.projection, cfg.betas, cfg.eps,
                      dp_group)
    if cfg.name == "mlbfgs":
        m = cfg.mlbfgs
        return MomentumLBFGS(named_params, groups, cfg.lr, m.history, m.update_period, m.beta, m.pair_momentum,
                             m.damping, m.min_curvature, m.max_curvature, m.momentum, m.granularity,
                             getattr(torch, m.history_dtype), m.normalize, dp_group, tp_group, pp_group, placements)
    if cfg.name == "sgd":
        return SGD(named_params, groups, cfg.lr, cfg.sgd.momentum, cfg.sgd.dampening, cfg.sgd.nesterov, dp_group)
    raise ValueError(f"optim.name={cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
