"""N:M sparse projection trained with SR-STE."""

import torch
from torch import nn

from kernels.nm import nm_linear, nm_mask, nm_sparsify, srste_decay_
from model.structured.base import StructuredLinear, normal_


class NMSparseLinear(StructuredLinear):
    """Dense weight whose ``n`` largest magnitudes in every group of ``m`` inputs are applied.

    The mask follows the weights at every step (SR-STE: dense straight-through gradient plus ``decay`` times
    the pruned weights). ``from_dense`` is magnitude selection, exact for an already N:M-sparse matrix.
    """

    name = "nm"
    optional = {"n": 2, "m": 4, "decay": 2e-4}
    example = {"n": 2, "m": 4}

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, decay: float = 2e-4):
        super().__init__(in_features, out_features)
        self.check_range("m", m, 1, in_features)
        self.check_divides("m", m, in_features=in_features)
        self.check_range("n", n, 1, m)
        self.check_range("decay", decay, 0.0, 1.0)
        self.n, self.m, self.decay = n, m, float(decay)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def reset_parameters(self, std, generator=None):
        normal_(self.weight, std, generator)
        with torch.no_grad():  # rescale so the *kept* entries carry the dense output variance exactly
            kept = self.weight * nm_mask(self.weight, self.n, self.m)
            self.weight.mul_(std * self.weight.numel() ** 0.5 / kept.norm())

    def forward(self, x):
        return self._at("out", nm_linear(self._at("in", x), self.weight, self.n, self.m))

    def regularize_grad(self):
        if self.weight.grad is not None:
            srste_decay_(self.weight, self.weight.grad, self.n, self.m, self.decay)

    def shard(self, tp_rank, tp_size, style, comm):
        # Like dense; a row split keeps every group of m inputs on one rank.
        self.check_tp(tp_size, **({"out_features": self.out_features} if style == "column"
                                  else {"groups_of_m": self.in_features // self.m}))
        return self._dense_style_shard(tp_rank, tp_size, style, comm)

    def to_dense(self):
        return nm_sparsify(self.weight, self.n, self.m)

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        return self.out_features * self.in_features * self.n // self.m
