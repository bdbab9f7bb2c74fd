"""Sparse plus low-rank projection (SLTrain, Han et al., 2024): ``W = U V + S`` on a fixed support."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lowrank import lowrank_expand, lowrank_project
from model.structured.base import LayerShard, StructuredLinear, StructureError, normal_, signed_svd, split


class SparseLowRankLinear(StructuredLinear):
    """Low-rank ``scale * U[out, r] V[r, in]`` plus ``nnz = round(density * out * in)`` trainable values.

    The sparse support is drawn once at random from the init generator and kept fixed (a persistent
    buffer of flat indices). ``from_dense`` alternates a rank-r SVD of the residual with a hard
    threshold of the ``nnz`` largest residual entries (GoDec), exact for a sparse-plus-low-rank input.

    Two initialisations (spec field ``init``):

    - ``variance`` (default): ``scale = 1``; the dense output variance (``init_std``) is split evenly
      between the two parts.
    - ``sltrain``: SLTrain's own (reference andyjm3/SLTrain): ``U = 0``, ``V`` and the sparse values uniform
      in ``+-1/sqrt(in)``, and the low-rank product scaled by ``scale = alpha / r`` in the forward pass (the
      parameters stay unscaled), so SLTrain's published learning rates transfer. ``alpha`` defaults to its
      reference's 32.
    """

    name = "sparse_lowrank"
    required = ("rank",)
    optional = {"density": 0.03, "init": "variance", "alpha": None}
    example = {"rank": 8, "density": 0.05}
    inits = ("variance", "sltrain")
    sltrain_alpha = 32.0

    fit_iters = 300

    def __init__(self, in_features: int, out_features: int, rank: int, density: float = 0.03,
                 init: str = "variance", alpha: float | None = None):
        super().__init__(in_features, out_features)
        self.check_range("rank", rank, 1, min(in_features, out_features))
        self.check_range("density", density, 0.0, 1.0, lo_open=True)
        if init not in self.inits:
            raise StructureError(f"{self.name}.init={init!r}; allowed: {', '.join(self.inits)}")
        if alpha is not None and init != "sltrain":
            raise StructureError(f"{self.name}.alpha applies to init: sltrain only (init is {init!r})")
        if alpha is not None and not alpha > 0:
            raise StructureError(f"{self.name}.alpha={alpha} must be > 0")
        self.rank, self.density, self.init = rank, float(density), init
        self.scale = (self.sltrain_alpha if alpha is None else float(alpha)) / rank if init == "sltrain" else 1.0
        """Factor of the low-rank product in the forward pass (SLTrain's alpha / r; 1 otherwise)."""
        nnz = max(1, round(density * in_features * out_features))
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.values = nn.Parameter(torch.empty(nnz))
        self.register_buffer("indices", torch.arange(nnz, dtype=torch.long))

    def reset_parameters(self, std, generator=None):
        total = self.in_features * self.out_features
        perm = torch.randperm(total, generator=generator)[: self.values.numel()]
        self.indices.copy_(perm.sort().values)
        if self.init == "sltrain":
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.u.zero_()
                self.v.uniform_(-bound, bound, generator=generator)
                self.values.uniform_(-bound, bound, generator=generator)
            return
        half = std / math.sqrt(2.0)
        normal_(self.v, 1.0 / math.sqrt(self.in_features), generator)
        normal_(self.u, half * math.sqrt(self.in_features / self.rank), generator)
        normal_(self.values, half / math.sqrt(self.values.numel() / total), generator)

    # A tensor-parallel shard keeps all values (replicated) and applies the window of the global sparse
    # matrix given by these (row, column) offsets; its value gradients are partial sums over ranks.
    _window: tuple[int, int] = (0, 0)
    _global_shape: tuple[int, int] | None = None

    def sparse_dense(self) -> torch.Tensor:
        """The sparse part scattered into ``[out, in]`` (this shard's window of it when sharded)."""
        rows, cols = self.u.shape[0], self.v.shape[1]
        full = self._global_shape or (rows, cols)
        flat = self.values.new_zeros(full[0] * full[1])
        dense = flat.index_put((self.indices,), self.values).view(full)
        r0, c0 = self._window
        return dense[r0:r0 + rows, c0:c0 + cols]

    def forward(self, x):
        z = lowrank_project(self._at("in", x), self.v)
        z = self._at("mid", z * self.scale if self.scale != 1.0 else z)  # [..., r]
        sparse = self._at("sparse_out", F.linear(self._at("sparse_in", x), self.sparse_dense()))
        return lowrank_expand(z, self.u) + sparse

    def shard(self, tp_rank, tp_size, style, comm):
        full = (self.out_features, self.in_features)
        if style == "column":  # U rows; gradients of the r-dim intermediate and of x (sparse path) reduced
            self.check_tp(tp_size, out_features=self.out_features)
            u = split(self.u, 0, tp_rank, tp_size)
            local = self._local(self.in_features, u.shape[0], {"u": u, "v": self.v, "values": self.values},
                                {"mid": comm.copy, "sparse_in": comm.copy})
            local._window = (tp_rank * u.shape[0], 0)
            placements = {"u": 0, "v": None}
        else:  # V columns; the r-dim intermediate and the sparse partial outputs are all-reduced
            self.check_tp(tp_size, in_features=self.in_features)
            v = split(self.v, 1, tp_rank, tp_size)
            local = self._local(v.shape[1], self.out_features, {"u": self.u, "v": v, "values": self.values},
                                {"mid": comm.reduce, "sparse_out": comm.reduce})
            local._window = (0, tp_rank * v.shape[1])
            placements = {"u": None, "v": 1}
        local._global_shape = full
        return LayerShard(local, {**placements, "values": None, "indices": None}, partial_grads=("values",))

    def to_dense(self):
        return self.scale * (self.u @ self.v) + self.sparse_dense()

    def _fit(self, w):
        nnz, r = self.values.numel(), self.rank
        sparse = torch.zeros_like(w)
        for _ in range(self.fit_iters):
            uu, s, vh = signed_svd(w - sparse)
            low = (uu[:, :r] * s[:r]) @ vh[:r]
            resid = (w - low).flatten()
            idx = resid.abs().topk(nnz).indices.sort().values
            new = torch.zeros_like(resid).index_put_((idx,), resid[idx]).view_as(w)
            done = (new - sparse).norm() <= 1e-12 * w.norm()
            sparse = new
            if done:
                break
        uu, s, vh = signed_svd(w - sparse)
        root = s[:r].sqrt()
        u, v = uu[:, :r] * root, root[:, None] * vh[:r]
        self._copy(self.u, u)
        self._copy(self.v, v / self.scale)
        self.indices.copy_(idx)
        self._copy(self.values, (w - u @ v).flatten()[idx])

    def num_params(self):
        return self.rank * (self.in_features + self.out_features) + self.values.numel()

    def executed_flops(self, tokens, device=None):
        # the sparse part is scattered into a dense matrix and applied as a dense product
        return 2 * tokens * (self.rank * (self.in_features + self.out_features) + self.out_features * self.in_features)
