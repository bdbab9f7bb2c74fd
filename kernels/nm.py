"""N:M sparsity: mask selection and the masked product with SR-STE gradients.

A weight ``[out, in]`` is cut into groups of ``m`` consecutive input columns per row; the ``n`` largest
magnitudes of each group are kept. SR-STE (Zhou et al., 2021): the forward uses the masked weight, the
backward passes the dense gradient straight through and adds ``decay * (1 - mask) * W`` so pruned weights
are pulled towards zero.
"""

import torch

from kernels.dispatch import use_triton
from kernels.lowrank import linear_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    @triton.jit
    def _nm_mask_kernel(w_ptr, out_ptr, groups, s_row, N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                        BLOCK_G: tl.constexpr):
        """One row, BLOCK_G groups: keep an entry when fewer than N entries of its group outrank it (larger
        magnitude, or equal magnitude at a lower index: topk's order for distinct values)."""
        row, pid = tl.program_id(0), tl.program_id(1)
        g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        j = tl.arange(0, MP)
        ok = (g[:, None] < groups) & (j[None, :] < M)
        offs = row.to(tl.int64) * s_row + g[:, None] * M + j[None, :]
        a = tl.abs(tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32))
        a = tl.where(ok, a, -1.0)  # padding never outranks a real entry
        ai, ak = a[:, :, None], a[:, None, :]  # [G, j, k]
        jj, kk = j[None, :, None], j[None, None, :]
        outranks = (ak > ai) | ((ak == ai) & (kk < jj))
        rank = tl.sum(outranks.to(tl.int32), axis=2)
        tl.store(out_ptr + offs, (rank < N).to(tl.int8), mask=ok)


def nm_mask_triton(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = w.shape
    w = w.detach().contiguous()
    out = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    groups = cols // m
    mp = triton.next_power_of_2(m)
    block_g = max(1, min(64, triton.next_power_of_2(groups)))
    _nm_mask_kernel[(rows, triton.cdiv(groups, block_g))](w, out, groups, w.stride(0), N=n, M=m, MP=mp,
                                                          BLOCK_G=block_g)
    return out.bool()


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of every group of ``m`` along dim -1."""
    if use_triton(w):
        return nm_mask_triton(w, n, m)
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


class _Decay(torch.autograd.Function):
    """Identity forward; backward adds SR-STE's ``decay * (1 - mask) * W`` to the weight gradient."""

    @staticmethod
    def forward(ctx, w, mask, decay):
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask) * w, None, None


def nm_linear(x: torch.Tensor, w: torch.Tensor, n: int, m: int, decay: float = 0.0) -> torch.Tensor:
    """``x @ (W * mask(W))^T`` with SR-STE gradients for ``W``.

    The Triton path selects the mask in one kernel and applies it inside the matmul's weight loads (the
    masked weight is never materialised); the weight gradient is the dense straight-through one.
    """
    if use_triton(x, w):
        mask = nm_mask_triton(w, n, m)
        wd = _Decay.apply(w, mask, decay) if decay else w
        return linear_triton(x, wd.contiguous(), mask)
    return x @ nm_sparsify(w, n, m, decay).t()
