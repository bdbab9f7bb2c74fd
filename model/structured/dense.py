"""Dense baseline ``y = x W^T``."""

import torch
import torch.nn.functional as F
from torch import nn

from model.structured.base import StructuredLinear, normal_


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
        self.check_tp(tp_size, **({"out_features": self.out_features} if style == "column"
                                  else {"in_features": self.in_features}))
        return self._dense_style_shard(tp_rank, tp_size, style, comm)

    def to_dense(self):
        return self.weight

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        return self.in_features * self.out_features
