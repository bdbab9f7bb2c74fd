"""Low-rank product ``y = x V^T U^T`` through the rank-r intermediate.

Split in two so a tensor-parallel layer can communicate the ``[..., r]`` intermediate between them.
"""

import torch


def lowrank_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[..., in] @ V[r, in]^T -> [..., r]``."""
    return x @ v.t()


def lowrank_expand(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[..., r] @ U[out, r]^T -> [..., out]``."""
    return z @ u.t()


def lowrank_matmul(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply ``W = U V`` (``U[out, r]``, ``V[r, in]``) without forming it: ``[..., in] -> [..., out]``."""
    return lowrank_expand(lowrank_project(x, v), u)
