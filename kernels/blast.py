"""BLAST product (Lee et al., 2024): block ``(i, j)`` of the matrix is ``U_i diag(S_ij) V_j^T``.

Three stages, so a tensor-parallel layer can communicate the compressed ``[..., b, r]`` intermediates:
``z_j = V_j^T x_j`` (project), ``w_i = sum_j S_ij * z_j`` (couple), ``y_i = U_i w_i`` (expand).
"""

import torch

from kernels.blockdiag import blockdiag_matmul, blockdiag_triton
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


def blast_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x[..., bj * q]``, ``V[bj, q, r]`` -> ``z[..., bj, r]``."""
    bj, q, r = v.shape
    if use_triton(x, v):
        return blockdiag_triton(x, v, input_major=True).reshape(*x.shape[:-1], bj, r)
    xb = x.reshape(*x.shape[:-1], bj, q)  # [..., bj, q]
    return torch.einsum("...jq,jqr->...jr", xb, v)


def blast_couple(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z[..., bj, r]``, ``S[bi, bj, r]`` -> ``w[..., bi, r]``."""
    if use_triton(z, s):
        return blast_couple_triton(z, s)
    return torch.einsum("...jr,ijr->...ir", z, s)


def blast_expand(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w[..., bi, r]``, ``U[bi, p, r]`` -> ``y[..., bi * p]``: the block-diagonal product with blocks U."""
    return blockdiag_matmul(w.reshape(*w.shape[:-2], -1), u)
