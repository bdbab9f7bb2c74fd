"""BLAST product (Lee et al., 2024): block ``(i, j)`` of the matrix is ``U_i diag(S_ij) V_j^T``."""

import torch


def blast_matmul(x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply a BLAST matrix through its ``[b, r]`` coupled intermediate.

    Args:
        x: ``[..., b * q]`` input.
        u: ``[b, p, r]`` left factors, one per output block row.
        s: ``[b, b, r]`` diagonal couplings ``S[i, j]``.
        v: ``[b, q, r]`` right factors, one per input block column.

    Returns:
        ``[..., b * p]``.
    """
    b, q, _ = v.shape
    p = u.shape[1]
    lead = x.shape[:-1]
    xb = x.reshape(*lead, b, q)  # [..., b, q]
    z = torch.einsum("...jq,jqr->...jr", xb, v)  # [..., b(j), r]
    w = torch.einsum("...jr,ijr->...ir", z, s)  # [..., b(i), r]
    y = torch.einsum("...ir,ipr->...ip", w, u)  # [..., b, p]
    return y.reshape(*lead, b * p)
