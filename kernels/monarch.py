"""Monarch product ``y = P_out L P_mid R x`` with two block-diagonal factors.

Layout (Dao et al., 2022, rectangular form): ``R`` has ``nb`` blocks ``[m, in/nb]`` producing a hidden
vector of size ``nb * m``; the hidden vector is re-read with stride ``nb`` (element ``h`` goes to block
``h % nb`` of the second factor), ``L`` has ``nb`` blocks ``[out/nb, m]``, and output element
``s * nb + l`` is row ``s`` of block ``l``.
"""

import torch


def monarch_matmul(x: torch.Tensor, r: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Apply a Monarch matrix.

    Args:
        x: ``[..., in]`` input.
        r: ``[nb, m, in/nb]`` right (first applied) block-diagonal factor.
        l: ``[nb, out/nb, m]`` left block-diagonal factor.

    Returns:
        ``[..., out]``.
    """
    nb, m, p = r.shape
    s = l.shape[1]
    lead = x.shape[:-1]
    xb = x.reshape(*lead, nb, p)  # [..., nb, p]
    h = torch.einsum("...kp,kqp->...kq", xb, r)  # [..., nb, m]
    # hidden index k*m + q is re-read as r_idx*nb + l_idx: view [m, nb], then blocks along nb.
    h = h.reshape(*lead, m, nb).transpose(-1, -2)  # [..., nb(l), m(r)]
    y = torch.einsum("...lr,lsr->...sl", h, l)  # [..., out/nb, nb]
    return y.reshape(*lead, s * nb)
