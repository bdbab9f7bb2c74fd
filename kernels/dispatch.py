"""Which implementation a product runs: Triton or the torch reference.

``STRUCTORCH_KERNELS`` = ``auto`` (default: Triton when every tensor is on CUDA and Triton is installed, the
reference elsewhere), ``triton`` (force the kernels; on CPU only under ``TRITON_INTERPRET=1``, as the tests
do) or ``reference``. Read at every call, so a test or a benchmark can switch it.
"""

import os

import torch

MODES = ("auto", "triton", "reference")


class KernelError(RuntimeError):
    """The requested kernel backend cannot run here."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    mode = os.environ.get("STRUCTORCH_KERNELS", "auto")
    if mode not in MODES:
        raise KernelError(f"STRUCTORCH_KERNELS={mode!r}; allowed: {', '.join(MODES)}")
    if mode == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise KernelError("STRUCTORCH_KERNELS=triton, but triton is not installed (pip install triton)")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelError("STRUCTORCH_KERNELS=triton needs CUDA tensors; on CPU set TRITON_INTERPRET=1 (the "
                          "Triton interpreter, slow, for tests) or use STRUCTORCH_KERNELS=reference")
    return True


def rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as a contiguous ``[rows, features]`` matrix (a view when it already is contiguous)."""
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 if x2.is_contiguous() else x2.contiguous()), x2.shape[0]
