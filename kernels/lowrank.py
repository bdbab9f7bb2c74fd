"""Low-rank product ``y = x V^T U^T`` through the rank-r intermediate.

Split in two so a tensor-parallel layer can communicate the ``[..., r]`` intermediate between them (a
row-parallel shard's ``lowrank_project`` returns the partial intermediate that the layer all-reduces).
"""

import torch

from kernels.dispatch import rows, use_triton
from kernels.triton_bmm import View, strided_bmm


def linear_triton(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., in] @ (W[out, in] * mask)^T`` with the Triton kernel (forward and backward)."""
    x2, m = rows(x)
    out, inp = w.shape
    y = strided_bmm(x2, View(1, m, inp, 0, inp, 1), w, View(1, inp, out, 0, 1, inp), (m, out),
                    View(1, m, out, 0, out, 1), mask)
    return y.reshape(*x.shape[:-1], out)


def lowrank_project(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[..., in] @ V[r, in]^T -> [..., r]``."""
    return linear_triton(x, v) if use_triton(x, v) else x @ v.t()


def lowrank_expand(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[..., r] @ U[out, r]^T -> [..., out]``."""
    return linear_triton(z, u) if use_triton(z, u) else z @ u.t()
