"""Momentum L-BFGS (mL-BFGS; Niu, Fabian, Lee, Soltanolkotabi and Avestimehr, TMLR 2023), block-wise and
distributed over the data-parallel owners.

Per step ``t`` (``g`` is the gradient plus the L2 term ``wd * theta``, as in the reference code):

- **momentum averages**: ``M_theta <- beta M_theta + (1 - beta) theta`` and ``M_g <- beta M_g + (1 - beta) g``,
  both started at the first step's values;
- **curvature pairs**, every ``T = update_period`` steps from step ``2T`` on: ``s = M_theta(t) - M_theta(t - T)``
  and ``y = M_g(t) - M_g(t - T)``, each mixed with the previous stored pair (``pair_momentum``:
  ``s <- (1 - m) s + m s_prev``, ``y <- (1 - m) y + m y_prev``), then **damped towards the identity**: with
  ``mu = s.y / s.s`` and ``tau0 = 1 - damping``, ``tau = min((1 - lo) / (1 - mu), tau0)`` when ``mu <= lo``,
  ``min((hi - 1) / (mu - 1), tau0)`` when ``mu >= hi``, else ``tau0``, and ``y <- tau y + (1 - tau) s``; so
  ``s.y / s.s`` ends in ``[lo, hi]`` and some identity is always mixed in. The newest ``history`` pairs are kept.
- **direction**: each block applies the two-loop recursion (``H0 = s.y / y.y`` of its newest pair) to ``g``; the
  directions of all blocks are divided by their *global* norm (over every block on every rank), and
- **update**: SGD with momentum on that direction, ``buf <- momentum buf + d``, ``theta <- theta - lr buf``.
  Until the first pair exists (step ``2T``) the direction is ``g`` itself: plain momentum SGD, the warm-up.

A block is one tensor, one transformer layer, or one pipeline stage (``granularity``); its dot products run over
all its tensors, summed over tensor-parallel shards, so the result does not depend on tp; with ``stage`` the
blocks are what each pipeline rank holds, so they change with pp by definition. Every block has one dp owner
(ZeRO-1 at block granularity); the owners compute their blocks and broadcast the updated parameters.

Numerics: ``s`` is accumulated from the exact applied steps (``M_theta(t) - M_theta(t-1) = (1 - beta)
(theta(t) - M_theta(t-1))``, with the lag ``theta - M_theta`` kept instead of ``M_theta``), so it does not lose
float32 precision to differences of large, nearly equal averages. Every state tensor is elementwise or a stack
of elementwise tensors (the history), so checkpoints reshard at any (dp, tp, pp).
"""

from collections.abc import Callable, Mapping

import torch

from parallel.data import global_norm, mesh_sum
from pretrain.optim.base import BlockOptimizer

GRANULARITIES = ("tensor", "layer", "stage")


def work_dtype(p: torch.Tensor) -> torch.dtype:
    """Averages and the recursion run in float32 (float64 for float64 parameters)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def block_key(granularity: str) -> Callable[[str], str]:
    """The block of a parameter name: itself (tensor), its transformer layer (``layers.<i>``; the embedding,
    final norm and output head are blocks of their own), or this rank's whole pipeline stage."""
    if granularity == "tensor":
        return lambda name: name
    if granularity == "layer":
        def layer(name: str) -> str:
            parts = name.split(".")
            return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        return layer
    if granularity == "stage":
        return lambda name: "stage"
    raise ValueError(f"granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")


class MomentumLBFGS(BlockOptimizer):
    """See the module docstring; defaults are the reference's published run (run-SLIM.sh)."""

    name = "mlbfgs"
    elementwise = ("lag", "s_acc", "grad_avg", "grad_snap", "momentum_buffer")
    stacked = ("s_hist", "y_hist")
    tp_reshardable = True

    def __init__(self, named_params, groups, lr: float, history: int = 10, update_period: int = 50,
                 beta: float = 0.999, pair_momentum: float = 0.9, damping: float = 0.01,
                 min_curvature: float = 0.01, max_curvature: float = 1.5, momentum: float = 0.9,
                 granularity: str = "layer", history_dtype: torch.dtype = torch.float32, normalize: bool = True,
                 dp_group=None,
                 tp_group=None, pp_group=None, placements: Mapping[str, int | None] | None = None):
        if history < 1 or update_period < 1:
            raise ValueError(f"history={history}, update_period={update_period}: both must be >= 1")
        if not 0 < min_curvature < 1 < max_curvature:
            raise ValueError(f"min_curvature={min_curvature}, max_curvature={max_curvature}: need "
                             "0 < min_curvature < 1 < max_curvature (damping blends towards curvature 1)")
        if not 0 <= damping < 1:
            raise ValueError(f"damping={damping}: must be in [0, 1)")
        defaults = {"lr": lr, "momentum": momentum}
        self.history, self.period, self.beta = history, update_period, beta
        self.pair_momentum, self.damping = pair_momentum, damping
        self.bounds = (min_curvature, max_curvature)
        self.history_dtype, self.normalize = history_dtype, normalize
        self.tp_group, self.pp_group = tp_group, pp_group
        self.placements = placements if placements is not None else {}
        """Split dimension of every tensor-parallel shard by name (the model's live dict); others replicated."""
        self.fresh: set[str] = set()
        """Parameters adopted since the last step: their averages start at their first gradient."""
        super().__init__(named_params, groups, defaults, dp_group, block_key(granularity))

    def init_state(self, p, group):
        def like():
            return torch.zeros(p.shape, dtype=work_dtype(p), device=p.device)

        def stack():
            dtype = torch.float64 if p.dtype == torch.float64 else self.history_dtype
            return torch.zeros((self.history, *p.shape), dtype=dtype, device=p.device)

        return {"lag": like(), "s_acc": like(), "grad_avg": like(), "grad_snap": like(),
                "momentum_buffer": like(), "s_hist": stack(), "y_hist": stack()}

    def adopt(self, named_params, role):
        super().adopt(named_params, role)
        self.fresh.update(name for name, _ in named_params)

    def forget(self, names):
        super().forget(names)
        self.fresh.difference_update(names)

    @property
    def device(self) -> torch.device:
        """Where the reductions run (the parameters' device: a rank that owns no block still joins them)."""
        return next(p.device for g in self.param_groups for p in g["params"])

    def sharded(self, name: str) -> bool:
        return self.placements.get(name) is not None

    # -- the schedule of pairs (a function of the step, the same on every rank) ----------------------------
    def pairs_formed(self, step: int) -> int:
        """Curvature pairs formed up to and including ``step`` (the first at step ``2T``)."""
        return max(0, step // self.period - 1)

    def _slots(self, step: int) -> list[int]:
        """History slots of the pairs in use at ``step``, oldest first."""
        total = self.pairs_formed(step)
        n = min(total, self.history)
        return [(total - n + k) % self.history for k in range(n)]

    # -- block-wise reductions ---------------------------------------------------------------------------
    def _block_sum(self, owned, parts: Callable[[torch.Tensor, dict], torch.Tensor], width: int,
                   index: dict[str, int]) -> torch.Tensor:
        """``[blocks, width]``: per block, the sum over its tensors of ``parts(p, state)`` (a ``[width]`` float64
        vector), shards summed over tp and replicated tensors counted once."""
        shard = torch.zeros(len(index), width, dtype=torch.float64, device=self.device)
        repl = torch.zeros_like(shard)
        for p, _ in owned:
            name = self.names[id(p)]
            (shard if self.sharded(name) else repl)[index[self.block_key(name)]] += parts(p, self.state[p])
        return mesh_sum(shard, repl, self.tp_group)

    def _block_index(self) -> dict[str, int]:
        """Row of every block this rank owns (all its tensors, with a gradient or not: tp peers agree)."""
        keys = sorted({self.block_key(n) for g in self.param_groups for p in g["params"] if self.owns(p)
                       for n in [self.names[id(p)]]})
        return {k: i for i, k in enumerate(keys)}

    # -- the step ----------------------------------------------------------------------------------------
    def directions(self, owned):
        t, beta = self.step_count, self.beta
        grads = {}
        for p, group in owned:
            st, name = self.state[p], self.names[id(p)]
            g = p.grad.to(work_dtype(p))
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            grads[id(p)] = g
            if t == 1 or name in self.fresh:
                st["grad_avg"].copy_(g)
                st["grad_snap"].copy_(g)
                st["lag"].zero_()
                st["s_acc"].zero_()
            else:
                st["grad_avg"].lerp_(g, 1.0 - beta)
                st["s_acc"].add_(st["lag"], alpha=1.0 - beta)
                st["lag"].mul_(beta)
        self.fresh.clear()
        index = self._block_index()
        if t % self.period == 0:
            if t >= 2 * self.period:
                self._push(owned, index, self.pairs_formed(t) - 1)
            for p, _ in owned:
                self.state[p]["s_acc"].zero_()
                self.state[p]["grad_snap"].copy_(self.state[p]["grad_avg"])
        if self.pairs_formed(t) == 0:  # warm-up: momentum SGD on the gradient
            return [grads[id(p)] for p, _ in owned]
        dirs = self._two_loop(owned, grads, index, self._slots(t))
        if not self.normalize:
            return dirs
        named = {self.names[id(p)]: d for (p, _), d in zip(owned, dirs, strict=True)}
        norm = global_norm(named, {n for n in named if self.sharded(n)}, self.tp_group, self.pp_group, self.dp_group,
                           self.device)
        if norm > 0:
            for d in dirs:
                d.div_(norm)
        return dirs

    def apply(self, p, d, group):
        st = self.state[p]
        buf = st["momentum_buffer"].mul_(group["momentum"]).add_(d)
        step = buf * -group["lr"]
        p.add_(step.to(p.dtype))
        st["lag"].add_(step)  # theta - M_theta grows by the step taken

    def _push(self, owned, index, number: int) -> None:
        """Form pair ``number`` (0 first) of every owned block from the averages, with pair momentum and damping,
        into history slot ``number % history``."""
        slot, prev = number % self.history, (number - 1) % self.history
        m = self.pair_momentum if number > 0 else 0.0
        new = {}
        for p, _ in owned:
            st = self.state[p]
            s = st["s_acc"].clone()
            y = st["grad_avg"] - st["grad_snap"]
            if m:
                s.mul_(1 - m).add_(st["s_hist"][prev], alpha=m)
                y.mul_(1 - m).add_(st["y_hist"][prev], alpha=m)
            new[id(p)] = (s, y)

        def dots(p, st):
            s, y = new[id(p)]
            return torch.stack([torch.dot(s.reshape(-1), s.reshape(-1)).double(),
                                torch.dot(s.reshape(-1), y.reshape(-1)).double()])

        ss, sy = self._block_sum(owned, dots, 2, index).unbind(1)
        lo, hi = self.bounds
        tau0 = 1.0 - self.damping
        mu = torch.where(ss > 0, sy / ss.clamp_min(1e-300), torch.ones_like(ss))
        tau = torch.full_like(mu, tau0)
        tau = torch.where(mu <= lo, ((1 - lo) / (1 - mu)).clamp(max=tau0), tau)
        tau = torch.where(mu >= hi, ((hi - 1) / (mu - 1)).clamp(max=tau0), tau)
        tau = torch.where(torch.isfinite(mu), tau, torch.zeros_like(tau))  # no usable y: the identity
        for p, _ in owned:
            st, (s, y) = self.state[p], new[id(p)]
            a = float(tau[index[self.block_key(self.names[id(p)])]])
            y.mul_(a).add_(s, alpha=1.0 - a)
            st["s_hist"][slot].copy_(s)
            st["y_hist"][slot].copy_(y)

    def _two_loop(self, owned, grads, index, slots: list[int]) -> list[torch.Tensor]:
        """``H g`` of every owned tensor, ``H`` its block's L-BFGS inverse Hessian over the pairs in ``slots``;
        block dot products are reduced over tp once per recursion step, for all blocks together."""
        n = len(slots)
        q = {id(p): grads[id(p)].reshape(-1).clone() for p, _ in owned}

        def hist(p, key, k):
            return self.state[p][key][slots[k]].reshape(-1).to(work_dtype(p))

        def row_dots(p, st):  # s_k.y_k for every pair, and y.y of the newest
            s = st["s_hist"][slots].reshape(n, -1).to(work_dtype(p))
            y = st["y_hist"][slots].reshape(n, -1).to(work_dtype(p))
            return torch.cat([(s * y).sum(1).double(), (y[-1] * y[-1]).sum().double().reshape(1)])

        sums = self._block_sum(owned, row_dots, n + 1, index)
        rho, yy = sums[:, :n], sums[:, n]
        inv_rho = 1.0 / rho
        valid = torch.isfinite(rho) & (rho > 0) & torch.isfinite(inv_rho)  # a zero pair (a block adopted since)
        inv_rho = torch.where(valid, inv_rho, torch.zeros_like(rho))
        newest = rho[:, -1]
        h0 = torch.where(valid[:, -1] & (yy > 0), newest / yy.clamp_min(1e-300), torch.ones_like(yy))
        rows = {id(p): index[self.block_key(self.names[id(p)])] for p, _ in owned}
        alpha = [None] * n
        for k in reversed(range(n)):
            dot = self._block_sum(owned, lambda p, st, k=k: torch.dot(hist(p, "s_hist", k), q[id(p)]).double()
                                  .reshape(1), 1, index)[:, 0]
            alpha[k] = dot * inv_rho[:, k]
            for p, _ in owned:
                q[id(p)].sub_(hist(p, "y_hist", k), alpha=float(alpha[k][rows[id(p)]]))
        for p, _ in owned:
            q[id(p)].mul_(float(h0[rows[id(p)]]))
        for k in range(n):
            dot = self._block_sum(owned, lambda p, st, k=k: torch.dot(hist(p, "y_hist", k), q[id(p)]).double()
                                  .reshape(1), 1, index)[:, 0]
            coef = alpha[k] - dot * inv_rho[:, k]
            for p, _ in owned:
                q[id(p)].add_(hist(p, "s_hist", k), alpha=float(coef[rows[id(p)]]))
        return [q[id(p)].view_as(p) for p, _ in owned]
