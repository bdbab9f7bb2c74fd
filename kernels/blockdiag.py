"""Block-diagonal product: ``nb`` independent ``[out/nb, in/nb]`` blocks.

A tensor-parallel shard holds whole blocks (a contiguous slice of ``w``'s first dim) and applies them to
its own input slice: the same call on the local tensors.
"""

import torch

from kernels.dispatch import rows, use_triton
from kernels.triton_bmm import View, strided_bmm


def blockdiag_triton(x: torch.Tensor, w: torch.Tensor, input_major: bool = False) -> torch.Tensor:
    """Blocks ``w[nb, p, q]`` (output x input), or ``w[nb, q, p]`` with ``input_major`` (e.g. BLAST's V)."""
    nb, p, q = (w.shape[0], w.shape[2], w.shape[1]) if input_major else w.shape
    x2, m = rows(x)
    # A[b, m, k] = x[m, b q + k];  B[b, k, j] = w[b, j, k] (or w[b, k, j]);  C[b, m, j] = y[m, b p + j]
    bv = View(nb, q, p, p * q, p, 1) if input_major else View(nb, q, p, p * q, 1, q)
    y = strided_bmm(x2, View(nb, m, q, q, nb * q, 1), w, bv, (m, nb * p), View(nb, m, p, p, nb * p, 1))
    return y.reshape(*x.shape[:-1], nb * p)


def blockdiag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply a block-diagonal matrix.

    Args:
        x: ``[..., nb * q]`` input.
        w: ``[nb, p, q]`` blocks; block ``i`` maps input slice ``i`` to output slice ``i``.

    Returns:
        ``[..., nb * p]``.
    """
    if use_triton(x, w):
        return blockdiag_triton(x, w)
    nb, p, q = w.shape
    xb = x.reshape(*x.shape[:-1], nb, q)  # [..., nb, q]
    yb = torch.einsum("...bq,bpq->...bp", xb, w)  # [..., nb, p]
    return yb.reshape(*x.shape[:-1], nb * p)
