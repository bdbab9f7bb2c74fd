"""Momentum L-BFGS (mL-BFGS, Niu et al., TMLR 2023) with a block-wise Hessian approximation.

Every block (a tensor, or its tensor-parallel shard) is its own quasi-Newton problem: it keeps ``history``
curvature pairs ``(s, y)`` and applies the L-BFGS two-loop recursion to its current gradient. Dot products
stay inside the block, so the work and memory land on the block's owner only and spread over the
data-parallel group, with no communication beyond ZeRO-1's.

The curvature pairs come from momentum averages (EMA factor ``momentum``), which average out the minibatch
noise that makes plain stochastic L-BFGS unstable: ``s`` averages the applied parameter steps and ``y`` the
matching gradient differences, and every ``update_period`` steps ``(s, y)`` joins the history. Both
averages use the same weights, so on a quadratic ``y = H s`` holds exactly. (The steps are the exact ones
the optimizer applied, not differences of rounded parameters, which lose float32 precision near a
minimum.)

Damping keeps the pair's curvature ``s.y / s.s`` inside ``[min_curvature, max_curvature]`` (``y`` is
shifted by a multiple of ``s`` below, scaled above), so the inverse-Hessian estimate stays positive
definite and bounded; pairs whose cosine ``s.y / (|s| |y|)`` is below ``MIN_COSINE`` (or non-finite) are
skipped. ``gamma = s.y / y.y`` of the newest pair scales the initial inverse Hessian.

The direction approximates a Newton step, so the learning rate is of order 1 (the schedule's warmup still
applies); a trust region caps every block's RMS direction at ``trust``, so no step moves a block by more
than ``lr * trust`` RMS, which also bounds the first steps, taken before a block has any pair.
"""

import torch

from pretrain.optim.base import BlockOptimizer

MIN_COSINE = 1e-4


class MomentumLBFGS(BlockOptimizer):
    name = "mlbfgs"
    elementwise = ("s_avg", "y_avg", "prev_grad", "last_step")

    def __init__(self, named_params, groups, lr: float, history: int = 10, momentum: float = 0.9,
                 update_period: int = 1, min_curvature: float = 1e-6, max_curvature: float = 1e6,
                 trust: float = 3e-3, dp_group=None):
        defaults = {"lr": lr, "history": history, "momentum": momentum, "update_period": update_period,
                    "min_curvature": min_curvature, "max_curvature": max_curvature, "trust": trust}
        super().__init__(named_params, groups, defaults, dp_group)

    def init_state(self, p, group):
        def like():
            return torch.zeros(p.shape, dtype=torch.float32, device=p.device)

        h = group["history"]
        return {"s_avg": like(), "y_avg": like(), "prev_grad": like(), "last_step": like(),
                "s_hist": torch.zeros(h, p.numel(), dtype=torch.float32, device=p.device),
                "y_hist": torch.zeros(h, p.numel(), dtype=torch.float32, device=p.device),
                "pairs": torch.zeros((), dtype=torch.int64, device=p.device),
                "head": torch.zeros((), dtype=torch.int64, device=p.device)}

    def direction(self, p, grad, state, group):
        g = grad.float()
        if self.step_count > 1:
            # momentum averages of the parameter steps (the exact applied steps, not differences of rounded
            # parameters) and of the gradient differences; the first ones start the averages
            weight = 1.0 if self.step_count == 2 else 1.0 - group["momentum"]
            state["s_avg"].lerp_(state["last_step"], weight)
            state["y_avg"].lerp_(g - state["prev_grad"], weight)
            if (self.step_count - 2) % group["update_period"] == 0:
                self._push(state["s_avg"], state["y_avg"], state, group)
        state["prev_grad"].copy_(g)
        d = self._two_loop(g.reshape(-1), state)
        rms = d.norm() / d.numel() ** 0.5
        if rms > group["trust"]:  # the trust region
            d.mul_(group["trust"] / rms)
        d = d.view_as(p)
        # the step the base class applies: p <- p (1 - lr wd) - lr d
        torch.add(d, p.float(), alpha=group["weight_decay"], out=state["last_step"]).mul_(-group["lr"])
        return d

    @staticmethod
    def _push(s: torch.Tensor, y: torch.Tensor, state: dict, group: dict) -> None:
        s, y = s.reshape(-1), y.reshape(-1)
        ss = torch.dot(s, s)
        curvature = torch.dot(s, y) / ss
        if not (ss > 0 and torch.isfinite(curvature)):
            return
        lo, hi = group["min_curvature"], group["max_curvature"]
        if curvature < lo:
            y = y + (lo - curvature) * s
        elif curvature > hi:
            y = y * (hi / curvature)
        sy, yy = torch.dot(s, y), torch.dot(y, y)
        # The (cautious) skip rule: s and y nearly orthogonal carry no usable curvature and make the two-loop
        # recursion ill-conditioned (rho = 1/s.y explodes).
        if not (torch.isfinite(yy) and sy > MIN_COSINE * torch.sqrt(ss * yy)):
            return
        head, h = int(state["head"]), state["s_hist"].shape[0]  # a ring buffer: the oldest pair is overwritten
        state["s_hist"][head].copy_(s)
        state["y_hist"][head].copy_(y)
        state["head"].fill_((head + 1) % h)
        state["pairs"].fill_(min(int(state["pairs"]) + 1, h))

    @staticmethod
    def _two_loop(q: torch.Tensor, state: dict) -> torch.Tensor:
        n = int(state["pairs"])
        if n == 0:
            return q.clone()
        h, head = state["s_hist"].shape[0], int(state["head"])
        pairs = [(state["s_hist"][i], state["y_hist"][i]) for i in ((head - n + k) % h for k in range(n))]
        rho = [1.0 / float(torch.dot(s, y)) for s, y in pairs]  # oldest first
        q = q.clone()
        alpha = [0.0] * n
        for k in reversed(range(n)):
            s, y = pairs[k]
            alpha[k] = rho[k] * float(torch.dot(s, q))
            q.sub_(y, alpha=alpha[k])
        s, y = pairs[-1]
        r = q.mul_(torch.dot(s, y) / torch.dot(y, y))
        for k, (s, y) in enumerate(pairs):
            r.add_(s, alpha=alpha[k] - rho[k] * float(torch.dot(y, r)))
        return r
