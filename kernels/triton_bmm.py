"""One Triton kernel for every structured product: a strided batched matmul with an optional B mask.

``C[g, i, j] = sum_k A[g, i, k] * B[g, k, j] (* MASK[g, k, j])`` where every operand is addressed through
its own (batch, row, col) strides into an ordinary tensor. The structures' layouts -- blocks of a
block-diagonal matrix, Monarch's stride permutation between its factors, BLAST's diagonal coupling
batched over the rank, a tensor-parallel shard's slice -- are strides, so no operand is ever copied into
a permuted or padded layout. Rows, columns and the reduction need not divide the tile sizes (masked
loads). Accumulation is fp32; inputs are fp32 or bf16, the output takes the inputs' dtype.

``structorch::strided_bmm`` is the product as a torch custom op (``torch.compile`` keeps it whole in its graph)
with its autograd: the backward is two more launches of the same kernel with transposed strides
(``dA = dC B^T``, ``dB = A^T dC``), written straight into the gradients' own layouts.

Tile configurations for Ampere and Hopper live in ``TILE_CONFIGS`` (autotuned per shape on CUDA); the
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernel) uses one small tile.
"""

import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency; dispatch reports its absence
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TILE_CONFIGS = {
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    "interpret": [(16, 16, 16, 1, 1)],
    "ampere": [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 3),
               (32, 64, 32, 2, 4), (16, 64, 32, 2, 4)],
    "hopper": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
               (64, 64, 64, 4, 3), (16, 64, 64, 2, 4)],
}


def _configs():
    if INTERPRET or not torch.cuda.is_available():
        key = "interpret"
    else:
        key = "hopper" if torch.cuda.get_device_capability()[0] >= 9 else "ampere"
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in TILE_CONFIGS[key]]


class View(NamedTuple):
    """A (batch, rows, cols) operand addressed by strides into a tensor."""

    batch: int
    rows: int
    cols: int
    s_batch: int
    s_row: int
    s_col: int

    @property
    def t(self) -> "View":
        """The transposed operand (rows and cols swapped), the same memory."""
        return View(self.batch, self.cols, self.rows, self.s_batch, self.s_col, self.s_row)


if triton is not None:
    @triton.autotune(configs=_configs(), key=["M", "N", "K"])
    @triton.jit
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, mask_ptr, M, N, K,
                    s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_mb, s_mk, s_mn,
                    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_base = a_ptr + g.to(tl.int64) * s_ab
        b_base = b_ptr + g.to(tl.int64) * s_bb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a_ok = (rm[:, None] < M) & (kk[None, :] < K)
            b_ok = (kk[:, None] < K) & (rn[None, :] < N)
            a = tl.load(a_base + rm[:, None].to(tl.int64) * s_am + kk[None, :] * s_ak, mask=a_ok, other=0.0)
            b = tl.load(b_base + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=b_ok, other=0.0)
            if HAS_MASK:
                keep = tl.load(mask_ptr + g.to(tl.int64) * s_mb + kk[:, None] * s_mk + rn[None, :] * s_mn,
                               mask=b_ok, other=0)
                b = tl.where(keep != 0, b, tl.zeros_like(b))
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot; upcast there only
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
        c_ok = (rm[:, None] < M) & (rn[None, :] < N)
        c = c_ptr + g.to(tl.int64) * s_cb + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def launch(a: torch.Tensor, av: View, b: torch.Tensor, bv: View, c: torch.Tensor, cv: View,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """``c[cv] = a[av] @ (b[bv] * mask[mv])`` (one launch; ``c`` is overwritten where ``cv`` addresses it)."""
    if not (av.batch == bv.batch == cv.batch and av.rows == cv.rows and bv.cols == cv.cols and av.cols == bv.rows):
        raise ValueError(f"strided bmm shapes do not chain: A {av}, B {bv}, C {cv}")
    m, n, k = av.rows, bv.cols, av.cols
    mv = bv  # a mask is addressed like B
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), av.batch)  # noqa: E731
    _bmm_kernel[grid](a, b, c, mask if mask is not None else b, m, n, k,
                      av.s_batch, av.s_row, av.s_col, bv.s_batch, bv.s_row, bv.s_col,
                      cv.s_batch, cv.s_row, cv.s_col, mv.s_batch, mv.s_row, mv.s_col,
                      HAS_MASK=mask is not None, UPCAST=INTERPRET)
    return c


@torch.library.custom_op("structorch::strided_bmm", mutates_args=())
def _strided_bmm(a: torch.Tensor, b: torch.Tensor, av: list[int], bv: list[int], c_shape: list[int],
                 cv: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """``C = A @ B`` (``B * mask`` with a mask addressed like ``b``) over strided views, into a new tensor of
    ``c_shape`` written through ``cv``: a custom op, so ``torch.compile`` keeps it whole in its graph."""
    c = torch.empty(c_shape, dtype=a.dtype, device=a.device)
    return launch(a, View(*av), b, View(*bv), c, View(*cv), mask)


@_strided_bmm.register_fake
def _(a, b, av, bv, c_shape, cv, mask=None):
    return a.new_empty(c_shape)


def _setup_context(ctx, inputs, output):
    a, b, av, bv, c_shape, cv, mask = inputs
    ctx.save_for_backward(a, b, mask)
    ctx.views = (View(*av), View(*bv), View(*cv))


def _backward(ctx, dc):
    """``dA = dC (B * mask)^T`` and ``dB = A^T dC``: two more launches with transposed strides, written straight
    into the gradients' own layouts. With a mask, the gradient of ``b`` is the dense one (a straight-through
    estimator; callers add any decay term themselves)."""
    a, b, mask = ctx.saved_tensors
    av, bv, cv = ctx.views
    dc = dc.contiguous()  # cv describes the contiguous layout the forward wrote
    da = db = None
    if ctx.needs_input_grad[0]:
        da = _strided_bmm(dc, b, list(cv), list(bv.t), list(a.shape), list(av), mask)
    if ctx.needs_input_grad[1]:
        db = _strided_bmm(a, dc, list(av.t), list(cv), list(b.shape), list(bv))
    return da, db, None, None, None, None, None


_strided_bmm.register_autograd(_backward, setup_context=_setup_context)


def strided_bmm(a: torch.Tensor, av: View, b: torch.Tensor, bv: View, c_shape, cv: View,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``A @ B`` on contiguous ``a`` and ``b`` addressed by ``av`` and ``bv``."""
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("strided_bmm takes contiguous tensors (views describe their layout)")
    return _strided_bmm(a, b, list(av), list(bv), list(c_shape), list(cv), mask)
