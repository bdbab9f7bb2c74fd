"""Block-sparse product over the kept blocks only: ``y = x @ (W * expand(mask))^T`` without touching a pruned block.

``W[out, in]`` is stored dense (so magnitude pruning and ``from_dense`` stay plain tensor operations) and
``mask[out/bs, in/bs]`` says which ``bs`` x ``bs`` blocks are kept. Work and activation memory scale with the
number of kept blocks ``K``:

- forward ``y[:, r] = sum_{c: mask[r, c]} x[:, c] W_rc^T`` (block-row ``r``, block-column ``c``);
- backward ``dx[:, c] = sum_{r: mask[r, c]} dy[:, r] W_rc`` and ``dW_rc = dy[:, r]^T x[:, c]`` for kept blocks only
  (pruned blocks get a zero gradient, as under the dense masked product).

The reference (CPU) batches the kept blocks: it gathers them and the input slices they read into one
``torch.bmm`` and scatters the partial outputs back with ``index_add``; it saves only ``x`` and ``W`` for the
backward, never the gathered copies. The Triton path (CUDA, or ``TRITON_INTERPRET=1``) reads the blocks in place
from ``W`` through a compressed-row index of the mask (the backward's input gradient uses the compressed-column
index of the same mask and the transposed strides), so no copy of ``W`` or ``x`` is made.
"""

import os

import torch

from kernels.dispatch import rows, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def block_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_rows, block_cols)`` of the kept blocks, row-major (``int64``)."""
    idx = mask.nonzero()
    return idx[:, 0], idx[:, 1]


# -- reference -------------------------------------------------------------------------------------------
def _gathered(t: torch.Tensor, bs: int) -> torch.Tensor:
    """``t[T, n * bs]`` as ``[n, T, bs]`` (block slices first)."""
    return t.view(t.shape[0], -1, bs).transpose(0, 1)


def _ref_forward(x2, w, grid, r_idx, c_idx, bs):
    n_rows = grid[0]
    blocks = w.view(n_rows, bs, grid[1], bs)[r_idx, :, c_idx, :]  # [K, bs(out), bs(in)]
    yk = torch.bmm(_gathered(x2, bs)[c_idx], blocks.transpose(1, 2))  # [K, T, bs]
    y = x2.new_zeros(n_rows, x2.shape[0], bs).index_add_(0, r_idx, yk)
    return y.transpose(0, 1).reshape(x2.shape[0], n_rows * bs)


def _ref_backward(x2, w, grid, r_idx, c_idx, bs, dy, need_x, need_w):
    n_rows, n_cols = grid
    wv = w.view(n_rows, bs, n_cols, bs)
    dyk = _gathered(dy, bs)[r_idx]  # [K, T, bs(out)]
    dx = dw = None
    if need_x:
        dxk = torch.bmm(dyk, wv[r_idx, :, c_idx, :])  # [K, T, bs(in)]
        dx = x2.new_zeros(n_cols, x2.shape[0], bs).index_add_(0, c_idx, dxk)
        dx = dx.transpose(0, 1).reshape(x2.shape)
    if need_w:
        dwk = torch.bmm(dyk.transpose(1, 2), _gathered(x2, bs)[c_idx])  # [K, bs(out), bs(in)]
        dw = torch.zeros_like(w)
        dw.view(n_rows, bs, n_cols, bs)[r_idx, :, c_idx, :] = dwk
    return dx, dw


# -- Triton ----------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _bsr_mm_kernel(x_ptr, w_ptr, y_ptr, ptr_ptr, idx_ptr, T, s_xt, s_yt, s_wo, s_wi,
                       BS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr):
        """``y[t, r BS + j] = sum_{p in ptr[r]:ptr[r+1]} sum_k x[t, idx[p] BS + k] W(r BS + j, idx[p] BS + k)``
        with ``W(a, b)`` at ``w_ptr + a s_wo + b s_wi``: the forward (CSR, W) and the input gradient (CSC, W^T)."""
        pid_t, r, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        start = tl.load(ptr_ptr + r)
        end = tl.load(ptr_ptr + r + 1)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for p in range(start, end):
            c = tl.load(idx_ptr + p)
            for k0 in range(0, BS, BLOCK_K):
                kk = k0 + rk
                a = tl.load(x_ptr + rt[:, None].to(tl.int64) * s_xt + (c * BS + kk)[None, :],
                            mask=(rt[:, None] < T) & (kk[None, :] < BS), other=0.0)
                b = tl.load(w_ptr + (r * BS + rn)[None, :].to(tl.int64) * s_wo + (c * BS + kk)[:, None] * s_wi,
                            mask=(kk[:, None] < BS) & (rn[None, :] < BS), other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc += tl.dot(a, b)
        ok = (rt[:, None] < T) & (rn[None, :] < BS)
        tl.store(y_ptr + rt[:, None].to(tl.int64) * s_yt + (r * BS + rn)[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _bsr_dw_kernel(x_ptr, dy_ptr, dw_ptr, rows_ptr, cols_ptr, T, s_xt, s_yt, s_wo,
                       BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                       UPCAST: tl.constexpr):
        """``dW[r BS + i, c BS + j] = sum_t dy[t, r BS + i] x[t, c BS + j]`` for the kept block ``p = (r, c)``."""
        p, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = tl.load(rows_ptr + p)
        c = tl.load(cols_ptr + p)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            a = tl.load(dy_ptr + tt[None, :].to(tl.int64) * s_yt + (r * BS + rm)[:, None],
                        mask=(tt[None, :] < T) & (rm[:, None] < BS), other=0.0)
            b = tl.load(x_ptr + tt[:, None].to(tl.int64) * s_xt + (c * BS + rn)[None, :],
                        mask=(tt[:, None] < T) & (rn[None, :] < BS), other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
        ok = (rm[:, None] < BS) & (rn[None, :] < BS)
        tl.store(dw_ptr + (r * BS + rm)[:, None].to(tl.int64) * s_wo + (c * BS + rn)[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=ok)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(bs: int) -> tuple[int, int]:
    """(token tile, block tile): at least 16 (tl.dot), the block tile at most 64."""
    return (16 if _interpret() else 64), max(16, min(64, triton.next_power_of_2(bs)))


def _compressed(major: torch.Tensor, minor: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointer array over ``n`` major indices and the minor indices ordered by major (a stable sort keeps the
    minor order of row-major pairs): the compressed-row index of the pairs."""
    order = torch.argsort(major, stable=True)
    counts = torch.bincount(major, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int32, device=major.device)
    ptr[1:] = counts.cumsum(0)
    return ptr, minor[order].to(torch.int32).contiguous()


@torch.library.custom_op("structorch::bsr_mm", mutates_args=())
def _bsr_mm(x2: torch.Tensor, w: torch.Tensor, s_wo: int, s_wi: int, ptr: torch.Tensor, idx: torch.Tensor,
            n_out: int, bs: int) -> torch.Tensor:
    """The kept blocks' product in one kernel (a custom op: ``torch.compile`` keeps it whole in its graph)."""
    t = x2.shape[0]
    y = torch.empty(t, n_out * bs, dtype=x2.dtype, device=x2.device)
    bt, bn = _tiles(bs)
    grid = (triton.cdiv(t, bt), n_out, triton.cdiv(bs, bn))
    _bsr_mm_kernel[grid](x2, w, y, ptr, idx, t, x2.stride(0), y.stride(0), s_wo, s_wi, BS=bs, BLOCK_T=bt,
                         BLOCK_N=bn, BLOCK_K=bn, UPCAST=_interpret())
    return y


@_bsr_mm.register_fake
def _(x2, w, s_wo, s_wi, ptr, idx, n_out, bs):
    return x2.new_empty(x2.shape[0], n_out * bs)


@torch.library.custom_op("structorch::bsr_dw", mutates_args=())
def _bsr_dw(x2: torch.Tensor, dy: torch.Tensor, w: torch.Tensor, r_idx: torch.Tensor, c_idx: torch.Tensor,
            bs: int) -> torch.Tensor:
    """The gradient of the kept blocks of ``w`` (zero elsewhere) in one kernel."""
    dw = torch.zeros_like(w)
    if r_idx.numel():
        bt, bn = _tiles(bs)
        launch = (r_idx.numel(), triton.cdiv(bs, bn), triton.cdiv(bs, bn))
        _bsr_dw_kernel[launch](x2, dy, dw, r_idx.to(torch.int32).contiguous(), c_idx.to(torch.int32).contiguous(),
                               x2.shape[0], x2.stride(0), dy.stride(0), dw.stride(0), BS=bs, BLOCK_M=bn,
                               BLOCK_N=bn, BLOCK_T=bt, UPCAST=_interpret())  # bf16 in tl.dot: see triton_bmm
    return dw


@_bsr_dw.register_fake
def _(x2, dy, w, r_idx, c_idx, bs):
    return torch.empty_like(w)


def _triton_forward(x2, w, grid, r_idx, c_idx, bs):
    ptr, idx = _compressed(r_idx, c_idx, grid[0])
    return _bsr_mm(x2, w, w.stride(0), w.stride(1), ptr, idx, grid[0], bs)


def _triton_backward(x2, w, grid, r_idx, c_idx, bs, dy, need_x, need_w):
    dx = dw = None
    if need_x:
        ptr, idx = _compressed(c_idx, r_idx, grid[1])
        dx = _bsr_mm(dy, w, w.stride(1), w.stride(0), ptr, idx, grid[1], bs)
    if need_w:
        dw = _bsr_dw(x2, dy, w, r_idx, c_idx, bs)
    return dx, dw


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, mask, bs, triton_path):
        r_idx, c_idx = block_index(mask)  # once: the backward reuses it
        ctx.save_for_backward(x2, w, r_idx, c_idx)
        ctx.grid, ctx.bs, ctx.triton_path = tuple(mask.shape), bs, triton_path
        return (_triton_forward if triton_path else _ref_forward)(x2, w, ctx.grid, r_idx, c_idx, bs)

    @staticmethod
    def backward(ctx, dy):
        x2, w, r_idx, c_idx = ctx.saved_tensors
        backward = _triton_backward if ctx.triton_path else _ref_backward
        dx, dw = backward(x2, w, ctx.grid, r_idx, c_idx, ctx.bs, dy.contiguous(), ctx.needs_input_grad[0],
                          ctx.needs_input_grad[1])
        return dx, dw, None, None, None


KEPT_BLOCKS_MAX_DENSITY = {"triton": 0.75, "reference": 0.25}
"""Kept fraction of the blocks up to which the kept-blocks product replaces the dense masked one, per path."""
REFERENCE_MIN_BLOCK = 64
"""The torch reference gathers and scatters per block; with smaller blocks it is slower than the dense masked
product on CPU at any density (tools/bench_kernels.py measures both: at density 0.25, 0.77-0.85x dense with
64-blocks and 0.43-0.64x with 128-blocks on the GPT-2-small shapes; 2.1-3.4x with 32-blocks)."""


def use_kept_blocks(x: torch.Tensor, mask: torch.Tensor, bs: int) -> bool:
    """Whether the kept-blocks product is the faster way to apply ``mask`` here (see the two thresholds)."""
    return _kept_blocks_pay(use_triton(x, mask), mask, bs)


def kept_blocks_pay(device: torch.device, mask: torch.Tensor, bs: int) -> bool:
    """``use_kept_blocks`` for an activation on ``device`` (FLOP accounting, before any activation exists)."""
    probe = torch.empty(0, device=device)
    return _kept_blocks_pay(use_triton(probe), mask, bs)


def _kept_blocks_pay(triton_path: bool, mask: torch.Tensor, bs: int) -> bool:
    density = float(mask.float().mean())
    if triton_path:
        return density <= KEPT_BLOCKS_MAX_DENSITY["triton"]
    return bs >= REFERENCE_MIN_BLOCK and density <= KEPT_BLOCKS_MAX_DENSITY["reference"]


def blocksparse_linear(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, bs: int) -> torch.Tensor:
    """``x[..., in] @ (W * expand(mask, bs))^T`` computing the kept blocks only.

    Args:
        x: ``[..., in]`` activation.
        w: ``[out, in]`` weight (pruned blocks are never read).
        mask: ``[out/bs, in/bs]`` bool, the kept blocks.
        bs: block side.
    """
    x2, _ = rows(x)
    w = w.contiguous()
    y = _BlockSparse.apply(x2, w, mask, bs, use_triton(x2, w))
    return y.reshape(*x.shape[:-1], w.shape[0])
