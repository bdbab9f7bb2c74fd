"""BLAST projection (Lee et al., 2024): block (i, j) of W is ``U_i diag(S_ij) V_j^T``."""

import math

import torch
from torch import nn

from kernels.blast import blast_couple, blast_expand, blast_project
from model.structured.base import LayerShard, StructuredLinear, largest_entry_sign, normal_, signed_svd, split


class BlastLinear(StructuredLinear):
    """``b x b`` blocks sharing left factors per block row and right factors per block column.

    Parameters ``U[b, out/b, r]``, ``S[b, b, r]``, ``V[b, in/b, r]``: ``r (in + out + b^2)`` in all.
    ``from_dense`` runs alternating least squares (each of U, V, S has a closed-form update given the
    other two), started from the block rows' and columns' singular vectors.
    """

    name = "blast"
    required = ("blocks", "rank")
    example = {"blocks": 4, "rank": 8}

    fit_iters = 300
    fit_tol = 1e-9

    def __init__(self, in_features: int, out_features: int, blocks: int, rank: int):
        super().__init__(in_features, out_features)
        self.check_divides("blocks", blocks, in_features=in_features, out_features=out_features)
        self.check_range("rank", rank, 1, min(in_features, out_features))
        self.blocks, self.rank = blocks, rank
        b = blocks
        self.u = nn.Parameter(torch.empty(b, out_features // b, rank))
        self.s = nn.Parameter(torch.empty(b, b, rank))
        self.v = nn.Parameter(torch.empty(b, in_features // b, rank))

    def reset_parameters(self, std, generator=None):
        # V: unit variance per z; S: unit variance after summing b blocks; U: r * su^2 = in * std^2.
        b = self.blocks
        normal_(self.v, 1.0 / math.sqrt(self.in_features // b), generator)
        normal_(self.s, 1.0 / math.sqrt(b), generator)
        normal_(self.u, std * math.sqrt(self.in_features / self.rank), generator)

    def forward(self, x):
        z = self._at("z", blast_project(self._at("in", x), self.v))  # [..., b, r]
        w = self._at("w", blast_couple(z, self.s))  # [..., b, r]
        return self._at("out", blast_expand(w, self.u))

    def shard(self, tp_rank, tp_size, style, comm):
        # Communication on the coupled [..., b, r] intermediates: a column shard owns block rows i (U_i, S_i:)
        # and all-reduces the gradient of z; a row shard owns block columns j (V_j, S_:j) and all-reduces w.
        self.check_tp(tp_size, blocks=self.blocks)
        if style == "column":
            u, s = split(self.u, 0, tp_rank, tp_size), split(self.s, 0, tp_rank, tp_size)
            local = self._local(self.in_features, u.shape[0] * u.shape[1], {"u": u, "s": s, "v": self.v},
                                {"z": comm.copy})
            return LayerShard(local, {"u": 0, "s": 0, "v": None})
        v, s = split(self.v, 0, tp_rank, tp_size), split(self.s, 1, tp_rank, tp_size)
        local = self._local(v.shape[0] * v.shape[1], self.out_features, {"u": self.u, "s": s, "v": v},
                            {"w": comm.reduce})
        return LayerShard(local, {"u": None, "s": 1, "v": 0})

    def to_dense(self):
        blocks = torch.einsum("ipr,ijr,jqr->ijpq", self.u, self.s, self.v)  # [b, b, p, q]
        return blocks.permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)

    def _fit(self, w):
        b = self.blocks
        p, q = self.out_features // b, self.in_features // b
        wb = w.reshape(b, p, b, q).permute(0, 2, 1, 3)  # [i, j, p, q]
        starts = [self._svd_start(wb)]
        algebraic = self._algebraic_start(wb, starts[0][0], starts[0][2])
        if algebraic is not None:
            starts.insert(0, algebraic)
        u, s, v, _ = min((self._als(wb, *start) for start in starts), key=lambda fit: fit[-1])
        u, s, v = self._canonical(u, s, v)
        self._copy(self.u, u)
        self._copy(self.s, s)
        self._copy(self.v, v)

    @staticmethod
    def _canonical(u, s, v):
        """One representative of the factors' gauge (per-block column scales and signs, the order of the rank
        components): unit columns of ``U_i`` and ``V_j`` whose largest-magnitude entry is positive, the scales
        and signs moved into ``S``, components ordered by the energy of ``S``. The fit then depends continuously
        on the matrix, so weights that differ by rounding give factors that differ by rounding (training after
        ``from_dense`` does not depend on micro-batching or topology)."""
        def normalise(f):  # f[block, rows, r] -> unit signed columns, and the factor moved out
            norm = f.norm(dim=1).clamp_min(1e-30)  # [block, r]
            sign = largest_entry_sign(f, dim=1)
            return f / (norm * sign)[:, None, :], norm * sign

        u, cu = normalise(u)
        v, cv = normalise(v)
        s = s * cu[:, None, :] * cv[None, :, :]
        order = s.pow(2).sum(dim=(0, 1)).argsort(descending=True)
        return u[..., order], s[..., order], v[..., order]

    @staticmethod
    def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``rhs @ gram^-1`` (batched) with a tiny ridge for rank-deficient blocks."""
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
        ridge = 1e-12 * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[..., None, None]
        return torch.linalg.solve(gram + ridge * eye, rhs.transpose(-1, -2)).transpose(-1, -2)

    def _coupling(self, wb, u, v):
        """Least-squares ``S`` for fixed ``U, V``: per block an ``r x r`` normal equation."""
        gram = (u.transpose(-1, -2) @ u)[:, None] * (v.transpose(-1, -2) @ v)[None]  # [i, j, r, r]
        rhs = torch.einsum("ipr,ijpq,jqr->ijr", u, wb, v)
        return self._solve(gram, rhs[..., None, :])[..., 0, :]

    def _svd_start(self, wb):
        """Top-r singular vectors of every block row (for U) and block column (for V)."""
        b, _, p, q = wb.shape
        r = self.rank

        def first(m):  # first r columns, zero-padded when the block has fewer singular vectors
            out = m.new_zeros(*m.shape[:-1], r)
            out[..., : min(r, m.shape[-1])] = m[..., :r]
            return out

        u = first(signed_svd(wb.permute(0, 2, 1, 3).reshape(b, p, b * q))[0])
        v = first(signed_svd(wb.permute(1, 3, 0, 2).reshape(b, q, b * p))[0])
        return u, self._coupling(wb, u, v), v

    def _algebraic_start(self, wb, u0, v0):
        """Closed-form factors when ``wb`` is (close to) BLAST, or None where it does not apply.

        In the singular bases ``U_i = U0_i A_i``, ``V_j = V0_j B_j``, the projected blocks are
        ``C_ij = A_i D_ij B_j^T``; ``C_00 C_10^-1 C_11 C_01^-1 = A_0 D A_0^-1`` gives ``A_0`` by an
        eigendecomposition, then ``B_j^T = A_0^-1 C_0j`` and ``A_i = C_i0 B_0^-T`` (absorbing the diagonals of
        block row and column 0) and ``S_ij = diag(A_i^-1 C_ij B_j^-T)``.
        """
        b, r = self.blocks, self.rank
        if b < 2 or r > min(wb.shape[-2:]):
            return None
        c = u0.transpose(-1, -2)[:, None] @ wb @ v0[None]  # [i, j, r, r]
        try:
            m = c[0, 0] @ torch.linalg.inv(c[1, 0]) @ c[1, 1] @ torch.linalg.inv(c[0, 1])
            a0 = torch.linalg.eig(m).eigenvectors.real
            bt = torch.linalg.solve(a0, c[0])  # [j, r, r]: B_j^T
            a = c[:, 0] @ torch.linalg.inv(bt[0])  # [i, r, r]
            d = torch.linalg.solve(a[:, None], c) @ torch.linalg.inv(bt)[None]  # [i, j, r, r]
        except RuntimeError:  # singular coupling blocks: no closed form
            return None
        u, v = u0 @ a, v0 @ bt.transpose(-1, -2)
        if not (torch.isfinite(u).all() and torch.isfinite(v).all() and torch.isfinite(d).all()):
            return None
        return u, d.diagonal(dim1=-2, dim2=-1), v

    def _als(self, wb, u, s, v):
        """Alternating least squares over U, V, S; returns the factors and their relative error."""
        norm = wb.norm().clamp_min(1e-30)

        def error(u, s, v):
            return float((wb - torch.einsum("ipr,ijr,jqr->ijpq", u, s, v)).norm() / norm)

        err = error(u, s, v)
        for _ in range(self.fit_iters):
            if err < self.fit_tol:
                break
            gram_u = torch.einsum("ijr,ijt,jrt->irt", s, s, v.transpose(-1, -2) @ v)
            u = self._solve(gram_u, torch.einsum("ijpq,jqr,ijr->ipr", wb, v, s))
            gram_v = torch.einsum("ijr,ijt,irt->jrt", s, s, u.transpose(-1, -2) @ u)
            v = self._solve(gram_v, torch.einsum("ijpq,ipr,ijr->jqr", wb, u, s))
            s = self._coupling(wb, u, v)
            prev, err = err, error(u, s, v)
            if prev - err < 1e-6 * err:  # stalled
                break
        return u, s, v, err

    def num_params(self):
        return self.u.numel() + self.s.numel() + self.v.numel()
