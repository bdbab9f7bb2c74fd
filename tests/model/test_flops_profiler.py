"""Our exact FLOP and parameter counts against DeepSpeed's FLOPs profiler (``tools/flops_check.py``), layer by layer
and for a whole GPT.

The profiler counts the torch products a forward calls. Where a structure's products are dense-shaped (dense,
low-rank, block-diagonal, Monarch, BLAST) it must see our count; where a sparse kind runs a dense masked product
(N:M, block sparsity below the kept-blocks threshold, sparse + low-rank's scattered sparse part) it sees the
executed count, which ``executed_flops`` reports beside the structured one."""

import pytest

from model.config import ModelConfig, StructureSpec
from model.structured import REGISTRY, build_linear, example_spec

pytest.importorskip("deepspeed.profiling.flops_profiler")
from tools import flops_check  # noqa: E402

TOKENS, IN, OUT = 16, 64, 96


@pytest.fixture(scope="module")
def rows():
    return {r["kind"]: r for r in flops_check.layer_rows(list(REGISTRY), IN, OUT, TOKENS)}


def test_every_structure_row_holds(rows):
    assert set(rows) == set(REGISTRY)
    assert all(r["ok"] for r in rows.values()), [(k, r["why"]) for k, r in rows.items() if not r["ok"]]


@pytest.mark.parametrize("kind", ["dense", "lowrank", "monarch"])
def test_dense_shaped_products_count_the_same(rows, kind):
    r = rows[kind]
    assert r["profiler"] == r["flops"] == r["executed"] and r["params_profiler"] == r["params"]


def test_blockdiag_counts_the_same_up_to_the_profilers_einsum_rounding(rows):
    r = rows["blockdiag"]
    assert abs(r["profiler"] - r["flops"]) <= flops_check.BLOCKDIAG_SLACK and r["params_profiler"] == r["params"]


def test_blast_differs_by_its_coupling_only(rows):
    # the profiler counts the two block GEMMs; the diagonal coupling w_i = sum_j S_ij * z_j is b^2 r
    # multiply-adds per token of elementwise products inside one autograd Function, which it does not see
    layer = build_linear(example_spec("blast"), IN, OUT)
    r = rows["blast"]
    assert r["flops"] == r["profiler"] + 2 * TOKENS * layer.blocks * layer.blocks * layer.rank
    assert r["params_profiler"] == r["params"]


@pytest.mark.parametrize("kind", ["nm", "blocksparse", "sparse_lowrank"])
def test_sparse_kinds_execute_dense_products(rows, kind):
    r = rows[kind]
    assert r["profiler"] == r["executed"] > r["flops"]  # zeros are multiplied too
    assert r["params_profiler"] >= r["params"]  # the profiler counts stored tensors, we count the kept weights


def test_a_wrong_count_fails_its_row(monkeypatch):
    cls = type(build_linear(example_spec("lowrank"), IN, OUT))
    monkeypatch.setattr(cls, "flops", lambda self, tokens: 0)
    assert not flops_check.layer_rows(["lowrank"], IN, OUT, TOKENS)[0]["ok"]


def test_whole_gpt_projections_and_head_match_and_attention_is_explained():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256, max_seq_len=32,
                      structure={"default": StructureSpec("lowrank", rank=8),
                                 "up": StructureSpec("blast", blocks=4, rank=8)})
    rows = {r["part"].split(" (")[0]: r for r in flops_check.model_rows(cfg, 32)}
    assert all(r["ok"] for r in rows.values())
    for slot in ("q", "k", "v", "o", "gate", "down"):
        assert rows[slot]["profiler"] == rows[slot]["ours"]  # low-rank: equal
    assert rows["up"]["profiler"] < rows["up"]["ours"]  # BLAST: the coupling
    assert rows["head"]["profiler"] == rows["head"]["ours"] == 2 * 64 * 256
    assert rows["attention"]["profiler"] == 2 * 4 * 64 * 32 > rows["attention"]["ours"]  # full square vs causal


def test_cli_prints_both_tables_and_refuses_bad_arguments(capsys):
    assert flops_check.main(["--structures", "dense,blast", "--config", "configs/tiny-cpu.yaml", "--seq-len", "32",
                             "--vocab-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "| blast |" in out and "| head |" in out and "all rows hold" in out
    assert flops_check.main(["--structures", "dense,bogus", "--shape", "64"]) == 2
    err = capsys.readouterr().err
    assert "--structures" in err and "--shape" in err and "allowed values" in err
