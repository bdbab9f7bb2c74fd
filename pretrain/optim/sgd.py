"""SGD with momentum (optionally Nesterov) on the block-wise framework: the baseline quasi-Newton papers use."""

import torch

from pretrain.optim.base import BlockOptimizer


class SGD(BlockOptimizer):
    """``torch.optim.SGD``'s momentum update (``buf = momentum buf + (1 - dampening) g``; Nesterov:
    ``g + momentum buf``) with decoupled weight decay like every optimizer here (torch's ``weight_decay`` adds
    ``wd p`` to the gradient instead). The buffer starts at zero, so with ``dampening`` > 0 the first step
    takes ``(1 - dampening) g`` where torch takes ``g`` (equal otherwise). Its one state tensor is elementwise,
    so checkpoints reshard at any (dp, tp, pp)."""

    name = "sgd"
    elementwise = ("momentum_buffer",)
    tp_reshardable = True

    def __init__(self, named_params, groups, lr: float, momentum: float = 0.9, dampening: float = 0.0,
                 nesterov: bool = False, dp_group=None):
        super().__init__(named_params, groups, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                                "nesterov": nesterov}, dp_group)

    def init_state(self, p, group):
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def direction(self, p, grad, state, group):
        buf, mu = state["momentum_buffer"], group["momentum"]
        if mu == 0:
            return grad
        buf.mul_(mu).add_(grad, alpha=1.0 - group["dampening"])
        return grad.add(buf, alpha=mu) if group["nesterov"] else buf
