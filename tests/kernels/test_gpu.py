"""On a CUDA machine (``tools/gpu_check.sh``): the Triton kernels compiled for the GPU against the torch reference
in fp32 and bf16, a compiled block with the kernels inside its graph, and NCCL multi-process loss equality.
Skipped cleanly without CUDA."""

import pytest
import torch

from model.structured import build_linear, example_spec
from tests.kernels.test_triton import PRODUCTS, TOL, g

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(fn, tensors, mode, monkeypatch):
    monkeypatch.setenv("STRUCTORCH_KERNELS", mode)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.float().mul(g(*y.shape, seed=9).cuda()).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PRODUCTS))
def test_compiled_kernel_matches_reference(name, dtype, monkeypatch):
    fn, shapes = PRODUCTS[name]
    tensors = [g(*s, seed=i).to("cuda", dtype) for i, s in enumerate(shapes)]
    ref_y, ref_g = _run(fn, [t.float() for t in tensors], "reference", monkeypatch)
    y, grads = _run(fn, tensors, "triton", monkeypatch)
    assert y.dtype == dtype and y.shape == ref_y.shape
    torch.testing.assert_close(y.float(), ref_y, **TOL[dtype])
    for got, ref in zip(grads, ref_g):
        torch.testing.assert_close(got.float(), ref, **TOL[dtype])


@pytest.mark.parametrize("kind", ["lowrank", "blockdiag", "monarch", "blast", "nm"])
def test_torch_compile_keeps_the_kernels_in_its_graph(kind, monkeypatch):
    """``fullgraph=True``: the custom ops (``structorch::*``) do not break the graph; outputs match eager."""
    monkeypatch.setenv("STRUCTORCH_KERNELS", "triton")
    layer = build_linear(example_spec(kind), 64, 96).cuda()
    layer.reset_parameters(0.02, torch.Generator().manual_seed(1))
    x = g(4, 33, 64).cuda()
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.dist
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_tensor_parallel_losses_follow_one_gpu(tiny_store, tmp_path):
    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tests.parallel.common import STRUCTURES, losses, max_rel_diff, tiny, topology, torchrun

    base = [*tiny(tiny_store, steps=10), "train.precision=fp32", "train.device=cuda"]
    for name in ("blast", "monarch"):
        Trainer(load_config(None, [*base, f"model.structure={{default: {STRUCTURES[name]}}}",
                                   f"train.out_dir={tmp_path / 'one' / name}"])).fit()
    torchrun(2, tmp_path / "two", ["blast", "monarch"], [*base, *topology(1, 2, 1)])
    for name in ("blast", "monarch"):
        diff = max_rel_diff(losses(tmp_path / "one" / name), losses(tmp_path / "two" / name), range(1, 11))
        assert diff < 1e-4, f"{name}: {diff:.2e}"
