"""Block-diagonal product: ``nb`` independent ``[out/nb, in/nb]`` blocks."""

import torch


def blockdiag_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply a block-diagonal matrix.

    Args:
        x: ``[..., nb * q]`` input.
        w: ``[nb, p, q]`` blocks; block ``i`` maps input slice ``i`` to output slice ``i``.

    Returns:
        ``[..., nb * p]``.
    """
    nb, p, q = w.shape
    xb = x.reshape(*x.shape[:-1], nb, q)  # [..., nb, q]
    yb = torch.einsum("...bq,bpq->...bp", xb, w)  # [..., nb, p]
    return yb.reshape(*x.shape[:-1], nb * p)
