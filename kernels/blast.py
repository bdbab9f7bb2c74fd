"""BLAST product (Lee et al., 2024): block ``(i, j)`` of the matrix is ``U_i diag(S_ij) V_j^T``.

Three stages, so a tensor-parallel layer can communicate the compressed ``[..., b, r]`` intermediates:
``z_j = V_j^T x_j`` (project), ``w_i = sum_j S_ij * z_j`` (couple), ``y_i = U_i w_i`` (expand).
"""

import torch

from kernels.blockdiag import blockdiag_triton
from kernels.dispatch import rows, use_triton
from kernels.triton_bmm import View, strided_bmm


def blast_couple_triton(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The diagonal coupling as a matmul batched over the rank: ``w[:, :, t] = z[:, :, t] @ S[:, :, t]^T``."""
    bi, bj, r = s.shape
    z2, m = rows(z.reshape(*z.shape[:-2], bj * r))
    # A[t, m, j] = z[m, j r + t];  B[t, j, i] = S[i, j, t];  C[t, m, i] = w[m, i r + t]
    w = strided_bmm(z2, View(r, m, bj, 1, bj * r, r), s, View(r, bj, bi, 1, r, bj * r), (m, bi * r),
                    View(r, m, bi, 1, bi * r, r))
    return w.reshape(*z.shape[:-2], bi, r)


class _Couple(torch.autograd.Function):
    """``w[i] = sum_j S[i, j] * z[j]`` on block-major ``z[bj, M, r]``: b^2 M r multiply-adds as ``b`` fused
    multiply-adds over whole blocks (a matmul batched over the rank would run ``r`` tiny products and copy
    ``z`` and ``w`` around them); the gradient of ``S`` is one matmul batched over the rank."""

    @staticmethod
    def forward(ctx, zb, s):
        ctx.save_for_backward(zb, s)
        w = zb[0] * s[:, 0, None, :]  # [bi, M, r]
        for j in range(1, s.shape[1]):
            w.addcmul_(zb[j], s[:, j, None, :])
        return w

    @staticmethod
    def backward(ctx, gw):
        zb, s = ctx.saved_tensors
        # under autocast z comes in bf16 and S is fp32: the forward promoted to w's dtype, the backward runs in it
        zw, sw = zb.to(gw.dtype), s.to(gw.dtype)
        gz = gw[0] * sw[0, :, None, :]  # [bj, M, r]
        for i in range(1, s.shape[0]):
            gz.addcmul_(gw[i], sw[i, :, None, :])
        gs = torch.bmm(gw.permute(2, 0, 1).contiguous(), zw.permute(2, 1, 0).contiguous())  # [r, bi, bj]
        return gz.to(zb.dtype), gs.permute(1, 2, 0).to(s.dtype)


def blast_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x[..., bj * q]``, ``V[bj, q, r]`` -> ``z[..., bj, r]``."""
    bj, q, r = v.shape
    if use_triton(x, v):
        return blockdiag_triton(x, v, input_major=True).reshape(*x.shape[:-1], bj, r)
    z = torch.bmm(x.reshape(-1, bj, q).transpose(0, 1), v)  # [bj, M, r]: one GEMM per block, no copy of x
    return z.transpose(0, 1).view(*x.shape[:-1], bj, r)  # block-major underneath, for couple and expand


def blast_couple(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z[..., bj, r]``, ``S[bi, bj, r]`` -> ``w[..., bi, r]``."""
    if use_triton(z, s):
        return blast_couple_triton(z, s)
    lead = z.shape[:-2]
    w = _Couple.apply(z.movedim(-2, 0).reshape(s.shape[1], -1, s.shape[2]), s)  # [bi, M, r]
    return w.view(s.shape[0], *lead, s.shape[2]).movedim(0, -2)  # [..., bi, r]


def blast_expand(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w[..., bi, r]``, ``U[bi, p, r]`` -> ``y[..., bi * p]``: the block-diagonal product with blocks U."""
    if use_triton(w, u):
        return blockdiag_triton(w.reshape(*w.shape[:-2], -1), u)
    bi, p, r = u.shape
    y = torch.bmm(w.movedim(-2, 0).reshape(bi, -1, r), u.transpose(1, 2))  # [bi, M, p]
    return y.transpose(0, 1).reshape(*w.shape[:-2], bi * p)
