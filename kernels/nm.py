"""N:M sparsity: mask selection and the masked product with SR-STE gradients.

A weight ``[out, in]`` is cut into groups of ``m`` consecutive input columns per row; the ``n`` largest
magnitudes of each group are kept. SR-STE (Zhou et al., 2021): the forward uses the masked weight, the
backward passes the dense gradient straight through and adds ``decay * (1 - mask) * W`` so pruned weights
are pulled towards zero.
"""

import torch


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of every group of ``m`` along dim -1."""
    rows, cols = w.shape
    groups = w.detach().abs().reshape(rows, cols // m, m)  # [out, in/m, m]
    keep = groups.topk(n, dim=-1).indices  # [out, in/m, n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


class _SRSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, n, m, decay):
        mask = nm_mask(w, n, m)
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        g = grad
        if ctx.decay:
            g = g + ctx.decay * (~mask) * w
        return g, None, None, None


def nm_sparsify(w: torch.Tensor, n: int, m: int, decay: float = 0.0) -> torch.Tensor:
    """Masked weight ``W * mask(W)`` with the SR-STE backward (plain STE when ``decay == 0``)."""
    return _SRSTE.apply(w, n, m, decay)


def nm_linear(x: torch.Tensor, w: torch.Tensor, n: int, m: int, decay: float = 0.0) -> torch.Tensor:
    """``x @ (W * mask(W))^T`` with SR-STE gradients for ``W``."""
    return x @ nm_sparsify(w, n, m, decay).t()
