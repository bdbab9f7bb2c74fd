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
        return F.linear(x, self.weight)

    def to_dense(self):
        return self.weight

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        return self.in_features * self.out_features

    def flops(self, tokens):
        return 2 * tokens * self.in_features * self.out_features
