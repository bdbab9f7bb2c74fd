"""Dense baseline ``y = x W^T``, optionally under a magnitude-pruning mask (``sparsity.rules``, method gmp)."""

import torch
from torch import nn

from model.structured.base import BlockMasked, StructuredLinear, normal_


class DenseLinear(BlockMasked, StructuredLinear):
    """Ordinary dense projection, ``W[out, in]``.

    ``enable_pruning`` adds a persistent ``mask`` of elements or square blocks that a pruning schedule rewrites;
    the forward then applies ``W * mask`` (pruned weights get no gradient) and ``num_params`` counts the kept
    weights. Without it there is no mask at all.
    """

    name = "dense"
    prune_granularities = ("element", "block", "nm")

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("mask", None)
        self.mask_block = 1
        self.nm_group = 1
        """Group of inputs a ``granularity: nm`` schedule selects within (kept whole by a row split)."""
        self.search_max = 1
        """Largest block a block-size search may choose (kept whole by either split)."""

    def enable_pruning(self, granularity, block_size):
        if granularity == "nm":  # an element mask whose updates keep the top weights of every group of m inputs
            self.check_divides("m", block_size, in_features=self.in_features)
            self.nm_group = block_size
            granularity = "element"
        bs = 1 if granularity == "element" else block_size
        self.check_divides("block_size", bs, in_features=self.in_features, out_features=self.out_features)
        self.mask_block = bs
        grid = (self.out_features // bs, self.in_features // bs)
        self.register_buffer("mask", torch.ones(grid, dtype=torch.bool, device=self.weight.device))

    def enable_block_search(self, candidates: list[int]) -> None:
        """A block mask at the smallest candidate block size whose pruning unit a block-size search sets later
        (buffer ``prune_block_size``); every candidate must divide the layer."""
        for bs in candidates:
            self.check_divides("block_size", bs, in_features=self.in_features, out_features=self.out_features)
        self.enable_pruning("block", min(candidates))
        self.search_max = max(candidates)
        self.register_buffer("prune_block_size", torch.tensor(min(candidates), dtype=torch.int64))

    def reset_parameters(self, std, generator=None):
        normal_(self.weight, std, generator)

    def forward(self, x):
        return self._at("out", self.masked_linear(self._at("in", x)))

    def shard(self, tp_rank, tp_size, style, comm):
        dim = 0 if style == "column" else 1
        units = {"out_features": self.out_features} if dim == 0 else {"in_features": self.in_features}
        if self.mask is not None:  # whole units on every rank: mask blocks, the largest block a search may choose,
            largest = max(self.search_max, self.mask_block)  # and under a row split whole N:M groups
            if dim == 1:
                largest = max(largest, self.nm_group)
            units = {("mask_block_rows" if dim == 0 else "mask_block_columns"):
                     self.mask.shape[dim] * self.mask_block // largest}
        self.check_tp(tp_size, **units)
        names = ("weight",) if self.mask is None else ("weight", "mask")
        return self._dense_style_shard(tp_rank, tp_size, style, comm, names)

    def to_dense(self):
        return self.masked_weight()

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        if self.mask is None:
            return self.in_features * self.out_features
        return self.kept_params()
