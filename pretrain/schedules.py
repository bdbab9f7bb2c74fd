"""Learning-rate schedules: pure functions of the step, so resuming needs no schedule state."""

import math

from pretrain.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a ``total_steps`` run.

    Linear warmup over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio * lr``, ``wsd``
    (stable at ``lr``, then linear decay over the last ``decay_fraction`` of training), or ``constant``.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    return peak - (peak - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
