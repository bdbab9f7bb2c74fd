"""Block-sparse projection: a dense weight under a mask of square blocks."""

import math

import torch
from torch import nn

from model.structured.base import BlockMasked, StructuredLinear, StructureError, block_energy, normal_


class BlockSparseLinear(BlockMasked, StructuredLinear):
    """``W * expand(mask)`` with ``mask[out/bs, in/bs]`` keeping ``round(density * blocks)`` blocks.

    The mask is a persistent buffer (saved with the model); sparsity schedules rewrite it. The initial
    mask is drawn at random from the init generator; ``from_dense`` keeps the blocks of largest Frobenius
    norm. ``num_params`` and ``flops`` count the kept blocks only.
    """

    name = "blocksparse"
    required = ("block_size",)
    optional = {"density": 0.5}
    example = {"block_size": 4, "density": 0.5}
    prune_granularities = ("block",)

    def __init__(self, in_features: int, out_features: int, block_size: int, density: float = 0.5):
        super().__init__(in_features, out_features)
        self.check_divides("block_size", block_size, in_features=in_features, out_features=out_features)
        self.check_range("density", density, 0.0, 1.0, lo_open=True)
        self.block_size, self.density = block_size, float(density)
        grid = (out_features // block_size, in_features // block_size)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("mask", torch.ones(grid, dtype=torch.bool))

    @property
    def mask_block(self) -> int:
        return self.block_size

    def enable_pruning(self, granularity, block_size):
        # a schedule prunes from density 1 over this layer's own blocks
        if granularity != "block" or block_size not in (None, self.block_size):
            raise StructureError(f"blocksparse is pruned by its own blocks: granularity block with block_size "
                                 f"{self.block_size} (or unset), not {granularity} / {block_size}")
        if self.density != 1.0:
            raise StructureError(f"blocksparse.density={self.density}: a pruning schedule starts dense; set "
                                 "density: 1.0 and the schedule's target instead")

    @property
    def kept_blocks(self) -> int:
        return max(1, round(self.density * self.mask.numel()))

    def _mask_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        keep = scores.flatten().topk(self.kept_blocks).indices
        return torch.zeros(self.mask.numel(), dtype=torch.bool).index_fill_(0, keep, True).view(self.mask.shape)

    def reset_parameters(self, std, generator=None):
        scores = torch.rand(self.mask.shape, generator=generator)
        self.mask.copy_(self._mask_from_scores(scores))
        # Only kept entries contribute: scale by 1/sqrt(kept fraction) to keep the output variance.
        normal_(self.weight, std / math.sqrt(self.kept_blocks / self.mask.numel()), generator)

    def forward(self, x):
        return self._at("out", self.masked_linear(self._at("in", x)))

    def shard(self, tp_rank, tp_size, style, comm):
        # Like dense, with the block mask split along the same dimension as the weight.
        dim = 0 if style == "column" else 1
        self.check_tp(tp_size, **{("block_rows" if dim == 0 else "block_columns"): self.mask.shape[dim]})
        return self._dense_style_shard(tp_rank, tp_size, style, comm, ("weight", "mask"))

    def to_dense(self):
        return self.masked_weight()

    def _fit(self, w):
        self.mask.copy_(self._mask_from_scores(block_energy(w, self.block_size)))
        self._copy(self.weight, w)

    def num_params(self):
        return self.kept_params()
