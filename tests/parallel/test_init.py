"""Sharded initialisation gives every rank, bit for bit, the slice of a full-model init from the same seed."""

import pytest
import torch

from model.structured import REGISTRY, example_spec
from model.structured import base as structured_base
from model.structured.base import normal_rows
from parallel.mesh import ParallelDims
from pretrain.config import load_config
from pretrain.train import build_parallel
from tests.distributed import run
from tests.parallel.test_training import SCHEDULED, SCHEDULED_STRUCTURE

CPU = torch.device("cpu")
CASES = {kind: (f"{{default: {example_spec(kind).flow()}}}", "[]") for kind in REGISTRY}
CASES["schedules"] = (SCHEDULED_STRUCTURE, SCHEDULED)
"""Every structure (masks and sparse supports drawn at init included), and every sparsity method's state (gmp and
block-search masks, N:M phases, self-guided dense guides computed from the initial weights, dense-first layers)."""


def _both(dims: ParallelDims, structure: str, rules: str, tie: bool):
    """(full init then slice, sharded init) of the same config on this rank, each with its counts."""
    overrides = [f"model.structure={structure}", f"sparsity.rules={rules}", "model.d_model=64", "model.n_layers=4",
                 "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=128", "model.vocab_size=512",
                 "model.max_seq_len=32", "data.seq_len=32", f"model.tie_embeddings={str(tie).lower()}",
                 "train.steps=20", "train.seed=3", "train.micro_batch=1"]
    cfg = load_config(None, overrides)
    old, *old_counts = build_parallel(cfg, dims, CPU, local_batch=4, sharded=False)
    new, *new_counts = build_parallel(cfg, dims, CPU, local_batch=4)
    return old, new, old_counts, new_counts


def _assert_identical(old, new, label: str) -> None:
    a, b = old.named_tensors(), new.named_tensors()
    assert sorted(a) == sorted(b), label
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{label}: {key} differs"
    assert old.placements == new.placements and old.partial == new.partial, label


def _check_topology(rank, world, tp, pp):
    dims = ParallelDims(1, tp, pp)
    dims.build_mesh("cpu")
    for name, (structure, rules) in CASES.items():
        tie = name == "dense" and pp == 1  # tied embeddings (tensor-parallel head on the embedding's rows)
        old, new, counts, sharded_counts = _both(dims, structure, rules, tie)
        _assert_identical(old, new, f"{name} tp={tp} pp={pp} rank {rank}")
        assert counts == sharded_counts, name
    return sorted(CASES)


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(4, 1), (2, 2)])
def test_sharded_init_equals_full_init_then_slice(tp, pp):
    assert run(_check_topology, tp * pp, tp, pp) == sorted(CASES)


def test_single_process_sharded_init_equals_full_init():
    for name, (structure, rules) in CASES.items():
        old, new, counts, sharded_counts = _both(ParallelDims(), structure, rules, tie=name == "lowrank")
        _assert_identical(old, new, name)
        assert counts == sharded_counts, name


@pytest.mark.parametrize("rows,cols,keep", [(97, 64, range(0, 97)), (513, 67, range(128, 256)),
                                            (50, 3, range(0, 0)), (1000, 40, range(990, 1000))])
def test_normal_rows_draws_in_chunks_what_one_draw_gives(rows, cols, keep, monkeypatch):
    """Chunked draws keep the full draw's values and leave the generator where it leaves it."""
    monkeypatch.setattr(structured_base, "NORMAL_CHUNK", 200)  # many chunks, ragged tails
    ref_gen = torch.Generator().manual_seed(5)
    ref = torch.randn(rows, cols, generator=ref_gen) * 0.02
    gen = torch.Generator().manual_seed(5)
    got = normal_rows(rows, cols, 0.02, gen, keep)
    assert torch.equal(got, ref[keep.start:keep.stop])
    assert torch.equal(torch.randn(33, generator=gen), torch.randn(33, generator=ref_gen))
