"""BLAST product (Lee et al., 2024): block ``(i, j)`` of the matrix is ``U_i diag(S_ij) V_j^T``.

Three stages, so a tensor-parallel layer can communicate the compressed ``[..., b, r]`` intermediates:
``z_j = V_j^T x_j`` (project), ``w_i = sum_j S_ij * z_j`` (couple), ``y_i = U_i w_i`` (expand).
"""

import torch

from kernels.dispatch import rows, use_triton
from kernels.triton_bmm import View, strided_bmm


def blast_project_triton(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bj, q, r = v.shape
    x2, m = rows(x)
    # A[j, m, k] = x[m, j q + k];  B[j, k, n] = V[j, k, n];  C[j, m, n] = z[m, j r + n]
    z = strided_bmm(x2, View(bj, m, q, q, bj * q, 1), v, View(bj, q, r, q * r, r, 1), (m, bj * r),
                    View(bj, m, r, r, bj * r, 1))
    return z.reshape(*x.shape[:-1], bj, r)


def blast_couple_triton(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The diagonal coupling as a matmul batched over the rank: ``w[:, :, t] = z[:, :, t] @ S[:, :, t]^T``."""
    bi, bj, r = s.shape
    z2, m = rows(z.reshape(*z.shape[:-2], bj * r))
    # A[t, m, j] = z[m, j r + t];  B[t, j, i] = S[i, j, t];  C[t, m, i] = w[m, i r + t]
    w = strided_bmm(z2, View(r, m, bj, 1, bj * r, r), s, View(r, bj, bi, 1, r, bj * r), (m, bi * r),
                    View(r, m, bi, 1, bi * r, r))
    return w.reshape(*z.shape[:-2], bi, r)


def blast_expand_triton(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    bi, p, r = u.shape
    w2, m = rows(w.reshape(*w.shape[:-2], bi * r))
    # A[i, m, t] = w[m, i r + t];  B[i, t, n] = U[i, n, t];  C[i, m, n] = y[m, i p + n]
    y = strided_bmm(w2, View(bi, m, r, r, bi * r, 1), u, View(bi, r, p, p * r, 1, r), (m, bi * p),
                    View(bi, m, p, p, bi * p, 1))
    return y.reshape(*w.shape[:-2], bi * p)


def blast_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x[..., bj * q]``, ``V[bj, q, r]`` -> ``z[..., bj, r]``."""
    if use_triton(x, v):
        return blast_project_triton(x, v)
    bj, q, _ = v.shape
    xb = x.reshape(*x.shape[:-1], bj, q)  # [..., bj, q]
    return torch.einsum("...jq,jqr->...jr", xb, v)


def blast_couple(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z[..., bj, r]``, ``S[bi, bj, r]`` -> ``w[..., bi, r]``."""
    if use_triton(z, s):
        return blast_couple_triton(z, s)
    return torch.einsum("...jr,ijr->...ir", z, s)


def blast_expand(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w[..., bi, r]``, ``U[bi, p, r]`` -> ``y[..., bi * p]``."""
    if use_triton(w, u):
        return blast_expand_triton(w, u)
    y = torch.einsum("...ir,ipr->...ip", w, u)  # [..., bi, p]
    return y.reshape(*w.shape[:-2], -1)


def blast_matmul(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply a BLAST matrix: ``U[b, p, r]``, ``S[b, b, r]``, ``V[b, q, r]``; ``[..., b*q] -> [..., b*p]``."""
    return blast_expand(blast_couple(blast_project(x, v), s), u)
