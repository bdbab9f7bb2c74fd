"""BLAST product (Lee et al., 2024): block ``(i, j)`` of the matrix is ``U_i diag(S_ij) V_j^T``.

Three stages, so a tensor-parallel layer can communicate the compressed ``[..., b, r]`` intermediates:
``z_j = V_j^T x_j`` (project), ``w_i = sum_j S_ij * z_j`` (couple), ``y_i = U_i w_i`` (expand).
"""

import torch


def blast_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x[..., bj * q]``, ``V[bj, q, r]`` -> ``z[..., bj, r]``."""
    bj, q, _ = v.shape
    xb = x.reshape(*x.shape[:-1], bj, q)  # [..., bj, q]
    return torch.einsum("...jq,jqr->...jr", xb, v)


def blast_couple(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``z[..., bj, r]``, ``S[bi, bj, r]`` -> ``w[..., bi, r]``."""
    return torch.einsum("...jr,ijr->...ir", z, s)


def blast_expand(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w[..., bi, r]``, ``U[bi, p, r]`` -> ``y[..., bi * p]``."""
    y = torch.einsum("...ir,ipr->...ip", w, u)  # [..., bi, p]
    return y.reshape(*w.shape[:-2], -1)


def blast_matmul(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply a BLAST matrix: ``U[b, p, r]``, ``S[b, b, r]``, ``V[b, q, r]``; ``[..., b*q] -> [..., b*p]``."""
    return blast_expand(blast_couple(blast_project(x, v), s), u)
