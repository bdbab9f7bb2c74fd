"""Low-rank projection ``W = U V`` with ``U[out, r]``, ``V[r, in]``."""

import math

import torch
from torch import nn

from kernels.lowrank import lowrank_expand, lowrank_project
from model.structured.base import LayerShard, StructuredLinear, normal_, signed_svd, split


class LowRankLinear(StructuredLinear):
    """Rank-r factorisation; ``from_dense`` is the truncated SVD (Eckart-Young optimal)."""

    name = "lowrank"
    required = ("rank",)
    example = {"rank": 8}

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
        z = self._at("mid", lowrank_project(self._at("in", x), self.v))  # [..., r]
        return self._at("out", lowrank_expand(z, self.u))

    def shard(self, tp_rank, tp_size, style, comm):
        # Communication happens on the [..., r] intermediate: column shards all-reduce its gradient
        # (V replicated), row shards all-reduce its partial sums before U (U replicated).
        if style == "column":
            self.check_tp(tp_size, out_features=self.out_features)
            u = split(self.u, 0, tp_rank, tp_size)
            local = self._local(self.in_features, u.shape[0], {"u": u, "v": self.v}, {"mid": comm.copy})
            return LayerShard(local, {"u": 0, "v": None})
        self.check_tp(tp_size, in_features=self.in_features)
        v = split(self.v, 1, tp_rank, tp_size)
        local = self._local(v.shape[1], self.out_features, {"u": self.u, "v": v}, {"mid": comm.reduce})
        return LayerShard(local, {"u": None, "v": 1})

    def to_dense(self):
        return self.u @ self.v

    def _fit(self, w):
        uu, s, vh = signed_svd(w)
        root = s[: self.rank].sqrt()
        self._copy(self.u, uu[:, : self.rank] * root)
        self._copy(self.v, root[:, None] * vh[: self.rank])

    def num_params(self):
        return self.rank * (self.in_features + self.out_features)
