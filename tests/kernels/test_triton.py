"""The Triton kernels (run by Triton's interpreter on CPU) against the torch references: outputs and
gradients, fp32 tight and bf16 loose, ragged row counts, whole layers and their tensor-parallel shards."""

import os

import pytest
import torch

from kernels.blast import blast_couple, blast_expand, blast_project
from kernels.blockdiag import blockdiag_matmul
from kernels.blocksparse import blocksparse_linear
from kernels.dispatch import KernelError, use_triton
from kernels.lowrank import lowrank_expand, lowrank_project
from kernels.monarch import monarch_left, monarch_right
from kernels.nm import nm_linear, nm_mask
from model.structured import build_linear, example_spec

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the interpreter runs (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA); "
                                       "on a GPU tests/kernels/test_gpu.py compiles the same products")

LEAD = (3, 5)  # 15 rows: not a multiple of any tile size
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BLOCK_MASK = torch.rand(5, 6, generator=torch.Generator().manual_seed(3)) < 0.5
BLOCK_MASK[0] = False  # a block-row with no kept block, and columns with none


PRODUCTS = {  # name: (function, input shapes (the first is the activation))
    "lowrank_project": (lowrank_project, [(*LEAD, 40), (6, 40)]),
    "lowrank_expand": (lowrank_expand, [(*LEAD, 6), (24, 6)]),
    "blockdiag": (blockdiag_matmul, [(*LEAD, 4 * 10), (4, 6, 10)]),
    "monarch_right": (monarch_right, [(*LEAD, 4 * 10), (4, 8, 10)]),
    "monarch_left": (monarch_left, [(*LEAD, 8 * 4), (4, 6, 8)]),
    "blast_project": (blast_project, [(*LEAD, 4 * 10), (4, 10, 6)]),
    "blast_couple": (blast_couple, [(*LEAD, 4, 6), (3, 4, 6)]),
    "blast_expand": (blast_expand, [(*LEAD, 3, 6), (3, 7, 6)]),
    "nm_linear": (lambda x, w: nm_linear(x, w, 2, 4), [(*LEAD, 32), (20, 32)]),
    "blocksparse": (lambda x, w: blocksparse_linear(x, w, BLOCK_MASK, 4), [(*LEAD, 6 * 4), (5 * 4, 6 * 4)]),
}


def run(fn, tensors, mode, monkeypatch):
    monkeypatch.setenv("STRUCTORCH_KERNELS", mode)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.float().mul(g(*y.shape, seed=9)).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_product_matches_reference(name, dtype, monkeypatch):
    fn, shapes = PRODUCTS[name]
    tensors = [g(*s, seed=i).to(dtype) for i, s in enumerate(shapes)]
    ref_y, ref_g = run(fn, [t.float() for t in tensors], "reference", monkeypatch)
    y, grads = run(fn, tensors, "triton", monkeypatch)
    assert y.dtype == dtype and y.shape == ref_y.shape
    torch.testing.assert_close(y.float(), ref_y, **TOL[dtype])
    for got, ref in zip(grads, ref_g):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (1, 3)])
def test_nm_mask_kernel_matches_topk(n, m, monkeypatch):
    w = g(16, 12 * m)
    masks = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("STRUCTORCH_KERNELS", mode)
        masks[mode] = nm_mask(w, n, m)
    assert torch.equal(masks["triton"], masks["reference"])
    assert int(masks["triton"].sum()) == 16 * 12 * n


class LocalComm:
    """A one-process stand-in for the tensor-parallel communicator: a shard computes its local part."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def copy(self, t):
        return t

    reduce = all_to_all = copy

    def scatter(self, t):
        return t.chunk(self.size, -1)[self.rank]

    def gather(self, t):
        return torch.cat([t] * self.size, -1)


LAYERS = {kind: example_spec(kind) for kind in ("lowrank", "blockdiag", "monarch", "blast", "nm")}
"""The structures with Triton products."""


@pytest.mark.parametrize("shard", ["full", "tp2-column", "tp2-row"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_and_its_tp_shard_match_reference(name, shard, monkeypatch):
    """The layers call the kernels on their local shard tensors as ``shard()`` lays them out."""
    full = build_linear(LAYERS[name], 32, 48)
    full.reset_parameters(0.02, torch.Generator().manual_seed(1))
    layer = full
    in_f = 32
    if shard != "full":
        style = shard.split("-")[1]
        layer = full.shard(1, 2, style, LocalComm(1, 2)).layer
        in_f = 32 if style == "column" else 16
    x = g(*LEAD, in_f)
    outs = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("STRUCTORCH_KERNELS", mode)
        layer.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_()
        y = layer(xl)
        y.mul(g(*y.shape, seed=5)).sum().backward()
        outs[mode] = (y.detach(), xl.grad, {n: p.grad.clone() for n, p in layer.named_parameters()})
    (ry, rx, rp), (ty, tx, tp) = outs["reference"], outs["triton"]
    torch.testing.assert_close(ty, ry, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tx, rx, rtol=1e-4, atol=1e-5)
    for n in rp:
        torch.testing.assert_close(tp[n], rp[n], rtol=1e-4, atol=1e-5, msg=n)


def test_dispatch_errors_name_the_setting(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("STRUCTORCH_KERNELS", "cuda")
    with pytest.raises(KernelError, match=r"STRUCTORCH_KERNELS='cuda'; allowed: auto, triton, reference"):
        use_triton(x)
    monkeypatch.setenv("STRUCTORCH_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match=r"needs CUDA tensors; on CPU set TRITON_INTERPRET=1"):
        use_triton(x)
    monkeypatch.setenv("STRUCTORCH_KERNELS", "auto")
    assert use_triton(x) is False  # CPU: the reference


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_keeps_the_kernels_in_one_graph(name, monkeypatch):
    """``torch.compile(fullgraph=True)`` over a layer on the Triton path: the kernels are custom ops
    (``structorch::strided_bmm``, ``structorch::nm_mask``), so neither the forward nor the backward breaks the graph;
    outputs and gradients equal eager's."""
    monkeypatch.setenv("STRUCTORCH_KERNELS", "triton")
    layer = build_linear(LAYERS[name], 32, 48)
    layer.reset_parameters(0.02, torch.Generator().manual_seed(1))
    x = g(*LEAD, 32)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        layer.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_()
        y = fn(xl)
        y.mul(g(*y.shape, seed=5)).sum().backward()
        results.append((y.detach(), xl.grad, [p.grad.clone() for p in layer.parameters()]))
    (ey, ex, ep), (cy, cx, cp) = results
    torch.testing.assert_close(cy, ey, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cx, ex, rtol=1e-5, atol=1e-6)
    for a, b in zip(cp, ep):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
