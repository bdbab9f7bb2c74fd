"""AdamW on the block-wise framework: the reference optimizer and the default."""

import torch

from pretrain.optim.base import BlockOptimizer, adam_direction


class AdamW(BlockOptimizer):
    """Decoupled weight decay Adam (Loshchilov and Hutter); every state tensor is elementwise."""

    name = "adamw"
    elementwise = ("exp_avg", "exp_avg_sq")
    tp_reshardable = True

    def __init__(self, named_params, groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, dp_group=None):
        super().__init__(named_params, groups, {"lr": lr, "betas": tuple(betas), "eps": eps}, dp_group)

    def init_state(self, p, group):
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def direction(self, p, grad, state, group):
        return adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], group["betas"], group["eps"],
                              self.step_count)
