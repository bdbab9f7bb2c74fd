"""Our exact FLOP and parameter counts against DeepSpeed's FLOPs profiler, layer by layer.

The profiler counts the torch products a forward calls. Where a structure's products are dense-shaped (dense,
low-rank, block-diagonal, Monarch, BLAST) it must see our count; where a sparse kind runs a dense masked product
(N:M, block sparsity below the kept-blocks threshold, sparse + low-rank's scattered sparse part) it sees the
executed count, which ``executed_flops`` reports beside the structured one."""

import pytest
import torch

from model.structured import build_linear, example_spec

profiler = pytest.importorskip("deepspeed.profiling.flops_profiler")
TOKENS, IN, OUT = 16, 64, 96


def _profile(kind):
    layer = build_linear(example_spec(kind), IN, OUT)
    layer.reset_parameters(0.02, torch.Generator().manual_seed(0))
    flops, _, params = profiler.get_model_profile(layer, input_shape=(1, TOKENS, IN), print_profile=False,
                                                  as_string=False)
    return layer, flops, params


@pytest.mark.parametrize("kind", ["dense", "lowrank", "monarch"])
def test_dense_shaped_products_count_the_same(kind):
    layer, flops, params = _profile(kind)
    assert flops == layer.flops(TOKENS) == layer.executed_flops(TOKENS)
    assert params == layer.num_params()


def test_blockdiag_counts_the_same_up_to_the_profilers_einsum_rounding():
    # the profiler takes an einsum's count from numpy's contraction path, 2 FLOPs below 2 x the multiply-adds here
    layer, flops, params = _profile("blockdiag")
    assert abs(flops - layer.flops(TOKENS)) <= 2 and params == layer.num_params()


def test_blast_differs_by_its_coupling_only():
    # the profiler counts the two block GEMMs; the diagonal coupling w_i = sum_j S_ij * z_j is b^2 r
    # multiply-adds per token of elementwise products inside one autograd Function, which it does not see
    layer, flops, params = _profile("blast")
    b, r = layer.blocks, layer.rank
    assert layer.flops(TOKENS) == flops + 2 * TOKENS * b * b * r
    assert params == layer.num_params()


@pytest.mark.parametrize("kind", ["nm", "blocksparse", "sparse_lowrank"])
def test_sparse_kinds_execute_dense_products(kind):
    layer, flops, params = _profile(kind)
    assert flops == layer.executed_flops(TOKENS) > layer.flops(TOKENS)  # zeros are multiplied too
    assert params >= layer.num_params()  # the profiler counts stored tensors, we count the kept weights
