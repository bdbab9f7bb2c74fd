"""Every structure's tensor-parallel shard reproduces the unsharded layer (outputs and gradients)."""

import pytest
import torch
import torch.distributed as dist

from model.structured import REGISTRY, build_linear, example_spec
from parallel.comm import CommStats, GroupComm, SequenceParallelComm
from parallel.tensor import partial_grads
from tests.distributed import run

SPECS = {kind: example_spec(kind) for kind in REGISTRY}
IN, OUT = 32, 48


def _check_all(rank, world, sequence_parallel=False):
    """Under sequence parallelism a column shard takes this rank's sequence shard of the input (all features)
    and a row shard returns this rank's sequence shard of the output."""
    comm = (SequenceParallelComm if sequence_parallel else GroupComm)(dist.group.WORLD)
    seq = 4 if sequence_parallel else 3
    checked = {}
    for name, spec in SPECS.items():
        for style in ("column", "row"):
            torch.manual_seed(0)
            full = build_linear(spec, IN, OUT).double()
            full.reset_parameters(0.02, torch.Generator().manual_seed(1))
            x = torch.randn(2, seq, IN, dtype=torch.double, requires_grad=True)
            gy = torch.randn(2, seq, OUT, dtype=torch.double)
            y = full(x)
            (y * gy).sum().backward()

            sh = full.shard(rank, world, style, comm)
            local = sh.layer
            comm.stats = CommStats()  # off by default; attached here to read what the forward sends
            def outside(t):  # what the region's border holds: a sequence shard under sequence parallelism
                return t.chunk(world, 1)[rank] if sequence_parallel else t

            if style == "column":
                xl = outside(x.detach()).clone().requires_grad_()
                yl = local(xl)
                forward = list(comm.stats.log)
                torch.testing.assert_close(yl, y.chunk(world, -1)[rank], rtol=1e-12, atol=1e-12)
                (yl * gy.chunk(world, -1)[rank]).sum().backward()
                torch.testing.assert_close(xl.grad, outside(x.grad), rtol=1e-12, atol=1e-12)
            else:
                xl = x.detach().chunk(world, -1)[rank].clone().requires_grad_()
                yl = local(xl)
                forward = list(comm.stats.log)
                torch.testing.assert_close(yl, outside(y), rtol=1e-12, atol=1e-12)
                (yl * outside(gy)).sum().backward()
                torch.testing.assert_close(xl.grad, x.grad.chunk(world, -1)[rank], rtol=1e-12, atol=1e-12)
            for pname, p in local.named_parameters():
                g = p.grad.clone()
                if pname in partial_grads(sh, comm):
                    comm.all_reduce_(g)
                ref = getattr(full, pname).grad
                dim = sh.placements[pname]
                expected = ref if dim is None else ref.chunk(world, dim)[rank]
                torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12, msg=f"{name} {style} {pname}")
            for tname in list(dict(local.named_parameters())) + list(dict(local.named_buffers())):
                assert tname in sh.placements, f"{name}: {tname} has no placement"
            checked[f"{name}-{style}"] = forward
    return checked


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layers_match_unsharded(world):
    checked = run(_check_all, world)
    assert len(checked) == 2 * len(SPECS)
    # Each structure communicates in its compressed space (README: tensor parallelism); 6 tokens per forward.
    tokens = 6
    assert checked["dense-row"] == [("all_reduce", tokens * OUT)]
    lowrank, blast, monarch = SPECS["lowrank"], SPECS["blast"], SPECS["monarch"]
    assert checked["lowrank-row"] == [("all_reduce", tokens * lowrank.rank)]  # the rank-r intermediate
    # the [blocks, rank] coupled intermediate
    assert checked["blast-row"] == [("all_reduce", tokens * blast.blocks * blast.rank)]
    assert checked["blockdiag-column"] == []  # whole blocks: nothing inside the layer
    # monarch: blocks * rank * blocks hidden units, each rank exchanges its 1/world
    hidden = monarch.blocks * monarch.rank * monarch.blocks
    assert checked["monarch-row"] == [("all_to_all", tokens * hidden // world), ("all_gather", tokens * OUT)]
    # column: R replicated (nothing forward, hidden gradient all-reduced) where that is cheaper (tp=2 here),
    # else the all-to-all layout (tp=4: 2 (3/16) 32 + (3/4) 32 = 36 < 2 (3/4) 32 = 48 elements per token)
    assert checked["monarch-column"] == ([] if world == 2 else [("all_to_all", tokens * hidden // world)])
    for key in ("dense-column", "lowrank-column", "blast-column"):
        assert checked[key] == [], key


def _check_all_sequence_parallel(rank, world):
    return _check_all(rank, world, sequence_parallel=True)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_shards_match_unsharded(world):
    """Every structure's unchanged shard, fed and read through the sequence-parallel borders: an all-gather /
    reduce-scatter (or one all-to-all) where tensor parallelism alone copies and all-reduces, the same bytes."""
    checked = run(_check_all_sequence_parallel, world)
    tokens = 8
    assert checked["dense-row"] == [("reduce_scatter", tokens * OUT)]
    assert checked["dense-column"] == [("all_gather", tokens * IN)]
    blast, lowrank = SPECS["blast"], SPECS["lowrank"]
    assert checked["lowrank-row"] == [("reduce_scatter", tokens * lowrank.rank)]  # still the rank-r intermediate
    assert checked["blast-column"] == [("all_gather", tokens * blast.blocks * blast.rank)]  # gathers z, not x
    assert checked["blockdiag-column"] == [("all_to_all", tokens * IN // world)]  # sequence shards -> feature slices
