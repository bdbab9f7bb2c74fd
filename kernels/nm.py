"""N:M sparsity: mask selection and the masked product with SR-STE gradients.

A weight ``[out, in]`` is cut into groups of ``m`` consecutive input columns per row; the ``n`` largest
magnitudes of each group are kept. SR-STE (Zhou et al., 2021): the forward uses the masked weight, the
backward passes the dense gradient straight through, and ``decay * (1 - mask) * W`` is added to the weight's
gradient once per optimizer step (``srste_decay_``), so pruned weights are pulled towards zero by the same
amount whatever the gradient accumulation.
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


@torch.library.custom_op("structorch::nm_mask", mutates_args=())
def nm_mask_triton(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask in one kernel (a custom op: ``torch.compile`` keeps it whole in its graph)."""
    rows, cols = w.shape
    w = w.detach().contiguous()
    out = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    groups = cols // m
    mp = triton.next_power_of_2(m)
    block_g = max(1, min(64, triton.next_power_of_2(groups)))
    _nm_mask_kernel[(rows, triton.cdiv(groups, block_g))](w, out, groups, w.stride(0), N=n, M=m, MP=mp,
                                                          BLOCK_G=block_g)
    return out.bool()


@nm_mask_triton.register_fake
def _(w, n, m):
    return w.new_empty(w.shape, dtype=torch.bool)


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of every group of ``m`` along dim -1."""
    if use_triton(w):
        return nm_mask_triton(w, n, m)
    rows, cols = w.shape
    groups = w.detach().abs().reshape(rows, cols // m, m)  # [out, in/m, m]
    keep = groups.topk(n, dim=-1).indices  # [out, in/m, n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, n, m, pruned_scale):
        mask = nm_mask(w, n, m)
        if pruned_scale == 0.0:
            return w * mask
        return w * torch.where(mask, 1.0, pruned_scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def nm_sparsify(w: torch.Tensor, n: int, m: int, pruned_scale: float = 0.0) -> torch.Tensor:
    """Masked weight ``W * (mask(W) + pruned_scale * (1 - mask(W)))`` with the straight-through backward (the
    dense gradient). ``pruned_scale`` > 0 is progressive gradient flow's mask decay (MDGF, Bambhaniya et al.,
    arXiv 2402.04744): the pruned weights still flow, scaled down."""
    return _STE.apply(w, n, m, float(pruned_scale))


def srste_decay_(w: torch.Tensor, grad: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
    """Add SR-STE's ``decay * (1 - mask(W)) * W`` to ``grad`` in place: once per optimizer step, on the
    accumulated gradient, so the result does not depend on micro-batching or topology."""
    if decay:
        grad.add_(w.detach() * ~nm_mask(w.detach(), n, m), alpha=decay)
    return grad


def nm_linear(x: torch.Tensor, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``x @ (W * mask(W))^T`` with the straight-through gradient for ``W`` (SR-STE's decay: ``srste_decay_``).

    The Triton path selects the mask in one kernel and applies it inside the matmul's weight loads (the
    masked weight is never materialised); the weight gradient is the dense straight-through one.
    """
    if use_triton(x, w):
        return linear_triton(x, w.contiguous(), nm_mask_triton(w, n, m))
    return x @ nm_sparsify(w, n, m).t()
