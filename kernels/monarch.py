"""Monarch product ``y = P_out L P_mid R x`` with two block-diagonal factors.

Layout (Dao et al., 2022, rectangular form): ``R`` has ``nbR`` blocks ``[m, in/nbR]`` producing a hidden
vector of ``nbR * m`` elements; the hidden vector is re-read with stride ``nbL`` (element ``h`` goes to
column ``h // nbL`` of block ``h % nbL`` of the second factor), ``L`` has ``nbL`` blocks ``[s, nbR*m/nbL]``,
and output element ``l * s + s_idx`` is row ``s_idx`` of block ``l`` (block-major, so a contiguous slice of
the output is a set of whole L blocks). The unsharded layer has ``nbR = nbL``; a tensor-parallel shard holds
a slice of R's blocks and a slice of L's blocks, and exchanges the hidden vector in between with one
all-to-all so that ``monarch_left`` sees every R block's contribution to its own L blocks.
"""

import torch

from kernels.blockdiag import blockdiag_matmul
from kernels.dispatch import rows, use_triton
from kernels.triton_bmm import View, strided_bmm


def monarch_left_triton(h: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The stride permutation is fused into the operand's strides: no permuted copy of ``h`` exists."""
    nbl, s, rl = l.shape
    h2, m = rows(h)
    # A[l, m, r] = h[m, r nbL + l];  B[l, r, j] = L[l, j, r];  C[l, m, j] = y[m, l s + j]
    y = strided_bmm(h2, View(nbl, m, rl, 1, rl * nbl, nbl), l, View(nbl, rl, s, s * rl, 1, rl), (m, nbl * s),
                    View(nbl, m, s, s, nbl * s, 1))
    return y.reshape(*h.shape[:-1], nbl * s)


def monarch_right(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """First factor, a block-diagonal product: ``[..., nbR * p] -> [..., nbR * m]`` (block-ordered hidden)."""
    return blockdiag_matmul(x, r)


def monarch_left(h: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Stride permutation and second factor: ``[..., rL * nbL] -> [..., nbL * s]`` (block-major output)."""
    if use_triton(h, l):
        return monarch_left_triton(h, l)
    nbl, s, rl = l.shape
    lead = h.shape[:-1]
    hb = h.reshape(*lead, rl, nbl).transpose(-1, -2)  # [..., nbL, rL]: element r*nbL + l -> block l
    y = torch.einsum("...lr,lsr->...ls", hb, l)  # [..., nbL, s]
    return y.reshape(*lead, nbl * s)
