"""Low-rank projection ``W = U V`` with ``U[out, r]``, ``V[r, in]``."""

import math

import torch
from torch import nn

from kernels.lowrank import lowrank_matmul
from model.structured.base import StructuredLinear, normal_


class LowRankLinear(StructuredLinear):
    """Rank-r factorisation; ``from_dense`` is the truncated SVD (Eckart-Young optimal)."""

    name = "lowrank"
    required = ("rank",)

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(in_features, out_features)
        self.check_range("rank", rank, 1, min(in_features, out_features))
        self.rank = rank
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))

    def reset_parameters(self, std, generator=None):
        # V keeps unit variance through the bottleneck; U carries the dense scale: r * su^2 * sv^2 = std^2.
        normal_(self.v, 1.0 / math.sqrt(self.in_features), generator)
        normal_(self.u, std * math.sqrt(self.in_features / self.rank), generator)

    def forward(self, x):
        return lowrank_matmul(x, self.u, self.v)

    def to_dense(self):
        return self.u @ self.v

    def _fit(self, w):
        uu, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[: self.rank].sqrt()
        self._copy(self.u, uu[:, : self.rank] * root)
        self._copy(self.v, root[:, None] * vh[: self.rank])

    def num_params(self):
        return self.rank * (self.in_features + self.out_features)

    def flops(self, tokens):
        return 2 * tokens * self.num_params()
