"""Sparse plus low-rank projection (SLTrain, Han et al., 2024): ``W = U V + S`` on a fixed support."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lowrank import lowrank_matmul
from model.structured.base import StructuredLinear, normal_


class SparseLowRankLinear(StructuredLinear):
    """Low-rank ``U[out, r] V[r, in]`` plus ``nnz = round(density * out * in)`` trainable values.

    The sparse support is drawn once at random from the init generator and kept fixed (a persistent
    buffer of flat indices). ``from_dense`` alternates a rank-r SVD of the residual with a hard
    threshold of the ``nnz`` largest residual entries (GoDec), exact for a sparse-plus-low-rank input.
    Init splits the dense output variance evenly between the two parts.
    """

    name = "sparse_lowrank"
    required = ("rank",)
    optional = {"density": 0.03}

    fit_iters = 300

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03):
        super().__init__(in_features, out_features)
        self.check_range("rank", rank, 1, min(in_features, out_features))
        self.check_range("density", density, 0.0, 1.0, lo_open=True)
        self.rank, self.density = rank, float(density)
        nnz = max(1, round(density * in_features * out_features))
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.values = nn.Parameter(torch.empty(nnz))
        self.register_buffer("indices", torch.arange(nnz, dtype=torch.long))

    def reset_parameters(self, std, generator=None):
        total = self.in_features * self.out_features
        perm = torch.randperm(total, generator=generator)[: self.values.numel()]
        self.indices.copy_(perm.sort().values)
        half = std / math.sqrt(2.0)
        normal_(self.v, 1.0 / math.sqrt(self.in_features), generator)
        normal_(self.u, half * math.sqrt(self.in_features / self.rank), generator)
        normal_(self.values, half / math.sqrt(self.values.numel() / total), generator)

    def sparse_dense(self) -> torch.Tensor:
        """The sparse part scattered into ``[out, in]``."""
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.indices,), self.values).view(self.out_features, self.in_features)

    def forward(self, x):
        return lowrank_matmul(x, self.u, self.v) + F.linear(x, self.sparse_dense())

    def to_dense(self):
        return self.u @ self.v + self.sparse_dense()

    def _fit(self, w):
        nnz, r = self.values.numel(), self.rank
        sparse = torch.zeros_like(w)
        for _ in range(self.fit_iters):
            uu, s, vh = torch.linalg.svd(w - sparse, full_matrices=False)
            low = (uu[:, :r] * s[:r]) @ vh[:r]
            resid = (w - low).flatten()
            idx = resid.abs().topk(nnz).indices.sort().values
            new = torch.zeros_like(resid).index_put_((idx,), resid[idx]).view_as(w)
            done = (new - sparse).norm() <= 1e-12 * w.norm()
            sparse = new
            if done:
                break
        uu, s, vh = torch.linalg.svd(w - sparse, full_matrices=False)
        root = s[:r].sqrt()
        u, v = uu[:, :r] * root, root[:, None] * vh[:r]
        self._copy(self.u, u)
        self._copy(self.v, v)
        self.indices.copy_(idx)
        self._copy(self.values, (w - u @ v).flatten()[idx])

    def num_params(self):
        return self.rank * (self.in_features + self.out_features) + self.values.numel()

    def flops(self, tokens):
        return 2 * tokens * self.num_params()
