"""Block-diagonal projection with an optional output channel shuffle."""

import math

import torch
from torch import nn

from kernels.blockdiag import blockdiag_matmul
from model.structured.base import LayerShard, StructuredLinear, StructureError, normal_, split


class BlockDiagLinear(StructuredLinear):
    """``nb`` independent blocks ``[out/nb, in/nb]``.

    With ``shuffle`` the output channels are interleaved (ShuffleNet channel shuffle: output ``j*nb + i``
    is row ``j`` of block ``i``), so a following block-diagonal layer mixes information across blocks.
    ``from_dense`` keeps the diagonal blocks, which is the Frobenius-optimal projection.
    """

    name = "blockdiag"
    required = ("blocks",)
    optional = {"shuffle": False}
    example = {"blocks": 4}

    def __init__(self, in_features: int, out_features: int, blocks: int, shuffle: bool = False):
        super().__init__(in_features, out_features)
        self.check_divides("blocks", blocks, in_features=in_features, out_features=out_features)
        self.blocks, self.shuffle = blocks, bool(shuffle)
        self.weight = nn.Parameter(torch.empty(blocks, out_features // blocks, in_features // blocks))

    def reset_parameters(self, std, generator=None):
        # Each output sees in/nb inputs instead of in: scale by sqrt(nb) to keep the output variance.
        normal_(self.weight, std * math.sqrt(self.blocks), generator)

    def _unshuffle(self, y: torch.Tensor) -> torch.Tensor:
        """Map block-ordered outputs (``i*p + j``) to shuffled order (``j*nb + i``)."""
        if not self.shuffle:
            return y
        return y.unflatten(-1, (self.blocks, -1)).transpose(-1, -2).flatten(-2)  # [..., p, nb] -> [..., out]

    def forward(self, x):
        return self._at("out", self._unshuffle(blockdiag_matmul(self._at("in", x), self.weight)))

    def shard(self, tp_rank, tp_size, style, comm):
        # Whole blocks per rank, no communication inside: a column shard reads only its blocks' input slice
        # (gradient all-gathered), a row shard's output slice is all-gathered.
        if self.shuffle:
            raise StructureError("blockdiag.shuffle=true interleaves outputs across all blocks and cannot be "
                                 "split over tensor-parallel ranks; use shuffle: false with parallel.tp > 1")
        self.check_tp(tp_size, blocks=self.blocks)
        w = split(self.weight, 0, tp_rank, tp_size)
        nb, p, q = w.shape
        hooks = {"in": comm.scatter} if style == "column" else {"out": comm.gather}
        in_f, out_f = (self.in_features, nb * p) if style == "column" else (nb * q, self.out_features)
        local = self._local(in_f, out_f, {"weight": w}, hooks)
        local.blocks = nb
        return LayerShard(local, {"weight": 0})

    def to_dense(self):
        dense = torch.block_diag(*self.weight.unbind(0))  # [out, in], block order
        return self._unshuffle(dense.t()).t()

    def _fit(self, w):
        if self.shuffle:  # undo the row interleave: row j*nb + i of w is block row i*p + j
            w = w.reshape(-1, self.blocks, self.in_features).transpose(0, 1).reshape(w.shape)
        nb, p, q = self.weight.shape
        blocks = w.reshape(nb, p, nb, q).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, p, q]
        self._copy(self.weight, blocks)

    def num_params(self):
        return self.weight.numel()
