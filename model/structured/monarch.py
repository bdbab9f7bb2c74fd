"""Monarch projection (Dao et al., 2022): two block-diagonal factors around a stride permutation."""

import math

import torch
from torch import nn

from kernels.monarch import monarch_left, monarch_right
from model.structured.base import LayerShard, StructuredLinear, normal_, signed_svd, split


class MonarchLinear(StructuredLinear):
    """``M = P_out L P_mid R`` with ``R[nb, c*nb, in/nb]`` and ``L[nb, out/nb, c*nb]``.

    ``rank`` c is the rank of every (output block, input block) sub-matrix of M (c = 1 is the classic
    Monarch matrix, ``2 n sqrt(n)`` parameters for ``nb = sqrt(n)``). ``from_dense`` is the closed-form
    projection: a rank-c SVD of each of the ``nb^2`` sub-matrices.
    """

    name = "monarch"
    required = ("blocks",)
    optional = {"rank": 1}
    example = {"blocks": 4, "rank": 2}

    def __init__(self, in_features: int, out_features: int, blocks: int, rank: int = 1):
        super().__init__(in_features, out_features)
        self.check_divides("blocks", blocks, in_features=in_features, out_features=out_features)
        nb = blocks
        self.check_range("rank", rank, 1, min(in_features, out_features) // nb)
        self.blocks, self.rank = nb, rank
        hidden = rank * nb  # per block
        self.r = nn.Parameter(torch.empty(nb, hidden, in_features // nb))
        self.l = nn.Parameter(torch.empty(nb, out_features // nb, hidden))

    def reset_parameters(self, std, generator=None):
        # R keeps unit variance (fan-in in/nb); each output sums c*nb hidden units:
        # c*nb * sl^2 = in * std^2  =>  sl = std * sqrt(in / (c*nb)).
        normal_(self.r, 1.0 / math.sqrt(self.in_features // self.blocks), generator)
        normal_(self.l, std * math.sqrt(self.in_features / (self.rank * self.blocks)), generator)

    def forward(self, x):
        h = self._at("mid", monarch_right(self._at("in", x), self.r))  # [..., nb * m]
        return self._at("out", monarch_left(h, self.l))

    def shard(self, tp_rank, tp_size, style, comm):
        # Every rank holds a contiguous run of L's blocks, so its outputs (block-major) are a contiguous slice.
        # Row: it also holds the matching R blocks (its input slice) and one all-to-all of the hidden vector
        # between the factors sends each rank the part that feeds its L blocks; the output slices are then
        # all-gathered. Column (replicated input): the same all-to-all layout plus an all-gather of the input
        # gradient, or R replicated (the full hidden vector computed on every rank, its gradient all-reduced),
        # whichever sends fewer bytes per token for this shape.
        nb, p = self.blocks, tp_size
        self.check_tp(p, blocks=nb)
        hidden = self.rank * nb * nb
        l = split(self.l, 0, tp_rank, p)
        out_f = self.out_features // p if style == "column" else self.out_features
        replicated_r = 2 * hidden * (p - 1) / p  # elements per token: all-reduce of the hidden gradient
        exchanged = 2 * hidden * (p - 1) / p**2 + self.in_features * (p - 1) / p  # 2 all-to-alls + gather
        lb = nb // p
        if style == "column" and replicated_r <= exchanged:
            first = tp_rank * lb

            def own_blocks(h):  # the full hidden vector -> the part feeding this rank's L blocks
                h = comm.copy(h)  # (a sequence-parallel copy gathers the sequence: read the shape after it)
                lead = h.shape[:-1]
                return h.reshape(*lead, -1, nb)[..., first:first + lb].reshape(*lead, -1)

            local = self._local(self.in_features, out_f, {"r": self.r, "l": l}, {"mid": own_blocks})
            return LayerShard(local, {"r": None, "l": 0})
        r = split(self.r, 0, tp_rank, p)

        def exchange(h):  # [..., kb*c*nb] (hidden index (k*c + t)*nb + l) -> [..., nb*c*lb]
            lead = h.shape[:-1]
            chunks = h.reshape(*lead, -1, p, lb).movedim(-2, 0)  # [tp (dest), ..., kb*c, lb]
            got = comm.all_to_all(chunks)  # [tp (source), ..., kb*c, lb]: sources hold k in rank order
            return got.movedim(0, -3).reshape(*lead, -1)

        edge = {"in": comm.scatter} if style == "column" else {"out": comm.gather}
        in_f = self.in_features if style == "column" else self.in_features // p
        local = self._local(in_f, out_f, {"r": r, "l": l}, {"mid": exchange, **edge})
        return LayerShard(local, {"r": 0, "l": 0})

    def _sub_blocks_to_dense(self, sub: torch.Tensor) -> torch.Tensor:
        """``sub[l, k, s, p]`` (output block l, input block k) -> ``[out, in]`` with row ``l*s + s_idx``."""
        return sub.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def to_dense(self):
        nb, c = self.blocks, self.rank
        s_dim, p_dim = self.out_features // nb, self.in_features // nb
        l4 = self.l.reshape(nb, s_dim, nb, c)  # [l, s, k, t]: hidden column r = k*c + t
        r4 = self.r.reshape(nb, c, nb, p_dim)  # [k, t, l, p]: hidden row q = t*nb + l
        sub = torch.einsum("lskt,ktlp->lksp", l4, r4)  # [l, k, s, p]
        return self._sub_blocks_to_dense(sub)

    def _fit(self, w):
        nb, c = self.blocks, self.rank
        s_dim, p_dim = self.out_features // nb, self.in_features // nb
        sub = w.reshape(nb, s_dim, nb, p_dim).permute(0, 2, 1, 3)  # [l, k, s, p]
        uu, sv, vh = signed_svd(sub)  # [l,k,s,x], [l,k,x], [l,k,x,p]
        root = sv[..., :c].sqrt()
        left = uu[..., :c] * root[..., None, :]  # [l, k, s, t]
        right = root[..., :, None] * vh[..., :c, :]  # [l, k, t, p]
        self._copy(self.l, left.permute(0, 2, 1, 3).reshape(self.l.shape))  # [l, s, k, t]
        self._copy(self.r, right.permute(1, 2, 0, 3).reshape(self.r.shape))  # [k, t, l, p]

    def num_params(self):
        return self.r.numel() + self.l.numel()
