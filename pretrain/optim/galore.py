"""GaLore (Zhao et al., 2024): Adam in a rank-r subspace of each matrix block's gradient.

For a block ``W[..., m, n]`` (leading dims are a batch of matrices, e.g. the blocks of a Monarch or BLAST
factor) the smaller side ``k = min(m, n)`` is projected: with ``m >= n`` the gradient ``G`` becomes
``R = G Q`` (``Q[n, r]``), else ``R = P^T G`` (``P[m, r]``), so the Adam moments are ``max(m, n) x r``
instead of ``m x n``. The projector is refreshed every ``update_gap`` steps from

* ``svd``: the top-r singular vectors of the current gradient, or
* ``dct`` (SVD-free): a fixed orthonormal DCT-II basis of size k, computed once per size, from which the r
  columns best aligned with the current gradient (largest ``||G q_j||``) are chosen; only their indices
  are stored.

The update ``scale * Q N`` (or ``scale * P N``) of the subspace Adam direction ``N`` is applied like any
other. Blocks that are not matrices, or whose smaller side is below the rank, and groups that are
not configured for GaLore (norms; embeddings unless enabled) use AdamW.
"""

import math
from functools import lru_cache

import torch

from pretrain.optim.base import BlockOptimizer, adam_direction


@lru_cache(maxsize=64)
def dct_basis(k: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II basis ``[k, k]``: column j is the j-th cosine (computed in float64, cached per
    size, dtype and device, so a GaLore step reuses it; do not modify the returned tensor)."""
    j = torch.arange(k, dtype=torch.float64)
    basis = torch.cos(math.pi * (2 * j[:, None] + 1) * j[None, :] / (2 * k)) * math.sqrt(2.0 / k)
    basis[:, 0] /= math.sqrt(2.0)
    return basis.to(dtype=dtype, device=device)


class GaLore(BlockOptimizer):
    name = "galore"
    elementwise = ("exp_avg", "exp_avg_sq")

    def __init__(self, named_params, groups, lr: float, rank: int, update_gap: int = 200, scale: float = 0.25,
                 projection: str = "svd", betas=(0.9, 0.95), eps: float = 1e-8, dp_group=None):
        if projection not in ("svd", "dct"):
            raise ValueError(f"optim.galore.projection={projection!r}; allowed: svd, dct")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "rank": rank, "update_gap": update_gap,
                    "scale": scale, "projection": projection, "galore": True}
        super().__init__(named_params, groups, defaults, dp_group)

    @staticmethod
    def projected(p: torch.Tensor, group: dict) -> bool:
        return group["galore"] and p.dim() >= 2 and min(p.shape[-2:]) >= group["rank"]

    def init_state(self, p, group):
        if not self.projected(p, group):
            return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        m, n = p.shape[-2:]
        big, k, r = max(m, n), min(m, n), group["rank"]
        lead = p.shape[:-2]
        if group["projection"] == "svd":
            proj = torch.zeros(*lead, k, r, dtype=torch.float32, device=p.device)
        else:
            proj = torch.zeros(*lead, r, dtype=torch.int64, device=p.device)
        moments = torch.zeros(*lead, big, r, dtype=torch.float32, device=p.device)
        return {"proj": proj, "sub_avg": moments, "sub_avg_sq": moments.clone()}

    def _basis(self, state: dict, group: dict, k: int, device) -> torch.Tensor:
        """The projector ``Q[..., k, r]`` with orthonormal columns."""
        if group["projection"] == "svd":
            return state["proj"]
        return dct_basis(k, device=device).T[state["proj"]].mT

    def _refresh(self, g: torch.Tensor, state: dict, group: dict) -> None:
        r = group["rank"]
        if group["projection"] == "svd":
            _, _, vh = torch.linalg.svd(g, full_matrices=False)
            state["proj"].copy_(vh[..., :r, :].mT)
        else:
            scores = (g @ dct_basis(g.shape[-1], device=g.device)).norm(dim=-2)  # [..., k]
            state["proj"].copy_(scores.topk(r, dim=-1).indices.sort(dim=-1).values)

    def direction(self, p, grad, state, group):
        if not self.projected(p, group):
            return adam_direction(grad, state["exp_avg"], state["exp_avg_sq"], group["betas"], group["eps"],
                                  self.step_count)
        left = p.shape[-2] < p.shape[-1]
        g = grad.float()
        g = g.mT if left else g  # [..., big, k]: always project the last (smaller) side
        if (self.step_count - 1) % group["update_gap"] == 0:
            self._refresh(g, state, group)
        q = self._basis(state, group, g.shape[-1], g.device)
        n = adam_direction(g @ q, state["sub_avg"], state["sub_avg_sq"], group["betas"], group["eps"],
                           self.step_count)
        d = (n @ q.mT).mul_(group["scale"])
        return d.mT if left else d
