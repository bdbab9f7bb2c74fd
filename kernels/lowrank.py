"""Low-rank product ``y = x V^T U^T`` through the rank-r intermediate."""

import torch


def lowrank_matmul(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply ``W = U V`` without forming it.

    Args:
        x: ``[..., in]`` input.
        u: ``[out, r]`` left factor.
        v: ``[r, in]`` right factor.

    Returns:
        ``[..., out]``.
    """
    z = x @ v.t()  # [..., r]
    return z @ u.t()  # [..., out]
