"""Dense baseline ``y = x W^T``."""

import torch
import torch.nn.functional as F
from torch import nn

from model.structured.base import LayerShard, StructuredLinear, normal_, split


class DenseLinear(StructuredLinear):
    """Ordinary dense projection, ``W[out, in]``."""

    name = "dense"

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def reset_parameters(self, std, generator=None):
        normal_(self.weight, std, generator)

    def forward(self, x):
        return self._at("out", F.linear(self._at("in", x), self.weight))

    def shard(self, tp_rank, tp_size, style, comm):
        if style == "column":  # W rows; the input gradient is all-reduced
            self.check_tp(tp_size, out_features=self.out_features)
            w = split(self.weight, 0, tp_rank, tp_size)
            local = self._local(self.in_features, w.shape[0], {"weight": w}, {"in": comm.copy})
            return LayerShard(local, {"weight": 0})
        self.check_tp(tp_size, in_features=self.in_features)  # row: W columns; partial outputs all-reduced
        w = split(self.weight, 1, tp_rank, tp_size)
        return LayerShard(self._local(w.shape[1], self.out_features, {"weight": w}, {"out": comm.reduce}),
                          {"weight": 1})

    def to_dense(self):
        return self.weight

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        return self.in_features * self.out_features

    def flops(self, tokens):
        return 2 * tokens * self.in_features * self.out_features
