"""The structured linear family against its dense reference."""

import math

import pytest
import torch

from model.config import StructureSpec as S
from model.structured import REGISTRY, StructureError, build_linear, structure_class

SHAPES = [(32, 64), (64, 32), (96, 96)]

# (spec, hand-computed parameter count as a function of (in, out))
CASES = [
    (S("dense"), lambda i, o: i * o),
    (S("lowrank", rank=8), lambda i, o: 8 * (i + o)),
    (S("blockdiag", blocks=4), lambda i, o: i * o // 4),
    (S("blockdiag", blocks=4, shuffle=True), lambda i, o: i * o // 4),
    (S("monarch", blocks=4), lambda i, o: 4 * (i + o)),
    (S("monarch", blocks=4, rank=2), lambda i, o: 2 * 4 * (i + o)),
    (S("blast", blocks=4, rank=6), lambda i, o: 6 * (i + o + 16)),
    (S("blocksparse", block_size=8, density=0.5), lambda i, o: round(0.5 * (i // 8) * (o // 8)) * 64),
    (S("nm", n=2, m=4), lambda i, o: i * o // 2),
    (S("nm", n=1, m=8), lambda i, o: i * o // 8),
    (S("sparse_lowrank", rank=4, density=0.05), lambda i, o: 4 * (i + o) + round(0.05 * i * o)),
    (S("sparse_lowrank", rank=4, density=0.05, init="sltrain", alpha=8),
     lambda i, o: 4 * (i + o) + round(0.05 * i * o)),
]
IDS = [f"{s.kind}-{'-'.join(f'{k}{v}' for k, v in s.params().items())}" for s, _ in CASES]


def make(spec, i, o, seed=0, std=0.02):
    layer = build_linear(spec, i, o).double()
    layer.reset_parameters(std, torch.Generator().manual_seed(seed))
    return layer


def test_every_registered_structure_is_covered():
    assert {s.kind for s, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec,count", CASES, ids=IDS)
def test_forward_and_gradients_match_dense_reference(spec, count, shape):
    i, o = shape
    layer = make(spec, i, o)
    x = torch.randn(2, 3, i, dtype=torch.double, requires_grad=True)
    gy = torch.randn(2, 3, o, dtype=torch.double)

    y = layer(x)
    grads = torch.autograd.grad((y * gy).sum(), [x, *layer.parameters()])
    dense = layer.to_dense()
    assert dense.shape == (o, i)
    y_ref = x @ dense.t()
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), [x, *layer.parameters()])

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,count", CASES, ids=IDS)
def test_bf16_autocast_forward_and_gradients_follow_fp32(spec, count):
    """``train.precision=bf16``: fp32 parameters under autocast; outputs, input and parameter gradients in their
    own dtypes and within bf16's precision of the fp32 run (no product may mix dtypes, forward or backward)."""
    layer = make(spec, 64, 96).float()
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(4, 8, 96, generator=torch.Generator().manual_seed(2))
    runs = []
    for precision in ("fp32", "bf16"):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = layer(xi)
        grads = torch.autograd.grad((y.float() * gy).sum(), [xi, *layer.parameters()])
        assert all(g.dtype == torch.float32 for g in grads)
        runs.append([y.float(), *grads])
    for got, want in zip(runs[1], runs[0]):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.05 * scale + 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec,count", CASES, ids=IDS)
def test_from_dense_round_trips_structured_matrices(spec, count, shape):
    i, o = shape
    layer = make(spec, i, o, seed=1)
    if spec.init == "sltrain":  # U starts at 0: give the matrix its low-rank part
        layer.u.data.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    dense = layer.to_dense().detach()
    fitted = structure_class(spec.kind).from_dense(dense, **spec.params())
    assert fitted.projection_error < 1e-6
    torch.testing.assert_close(fitted.to_dense(), dense, rtol=0, atol=1e-6 * dense.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec,count", CASES, ids=IDS)
def test_param_and_flop_counts_match_formulas(spec, count, shape):
    i, o = shape
    layer = make(spec, i, o)
    assert layer.num_params() == count(i, o)
    assert layer.flops(7) == 2 * 7 * count(i, o)


@pytest.mark.parametrize("spec,count", CASES, ids=IDS)
def test_init_output_variance_matches_dense(spec, count):
    if spec.init == "sltrain":
        pytest.skip("SLTrain's init is its reference's, not variance-matched (test_sltrain_init)")
    i, o, std = 256, 256, 0.02
    x = torch.randn(2048, i, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    ratios = [make(spec, i, o, seed=s, std=std)(x).var().item() / (i * std**2) for s in range(3)]
    assert 0.8 < sum(ratios) / len(ratios) < 1.25, ratios


def test_sltrain_init_follows_its_reference():
    """andyjm3/SLTrain: B (our U) = 0, A (our V) and the sparse values uniform in +-1/sqrt(in), the product
    scaled by alpha / r in the forward pass; the default alpha is the reference's 32."""
    i, o, r = 256, 128, 16
    layer = make(S("sparse_lowrank", rank=r, density=0.05, init="sltrain", alpha=8), i, o)
    bound = 1 / math.sqrt(i)
    assert (layer.u == 0).all() and layer.scale == 8 / r
    for t in (layer.v, layer.values):
        assert t.abs().max() <= bound and t.abs().max() > 0.99 * bound
        assert t.var().item() == pytest.approx(bound**2 / 3, rel=0.1)  # uniform, not normal
    with torch.no_grad():
        layer.u.normal_()
    sparse = layer.sparse_dense()
    torch.testing.assert_close(layer.to_dense(), 8 / r * layer.u @ layer.v + sparse)
    assert make(S("sparse_lowrank", rank=r, init="sltrain"), i, o).scale == 32 / r
    assert make(S("sparse_lowrank", rank=r), i, o).scale == 1.0


def test_from_dense_reports_error_of_a_general_matrix():
    w = torch.randn(48, 64, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    layer = structure_class("lowrank").from_dense(w, rank=10)
    sv = torch.linalg.svdvals(w)
    expected = (sv[10:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt()).item()  # Eckart-Young
    assert layer.projection_error == pytest.approx(expected, rel=1e-9)
    for kind, params in [("blockdiag", {"blocks": 4}), ("monarch", {"blocks": 4}), ("blast", {"blocks": 4, "rank": 4}),
                         ("blocksparse", {"block_size": 8, "density": 0.25}), ("nm", {}),
                         ("sparse_lowrank", {"rank": 4, "density": 0.1})]:
        err = structure_class(kind).from_dense(w, **params).projection_error
        assert 0.05 < err < 1.0, (kind, err)


def test_blockdiag_projection_keeps_diagonal_blocks():
    w = torch.randn(32, 32, dtype=torch.double)
    fitted = structure_class("blockdiag").from_dense(w, blocks=4)
    mask = torch.block_diag(*[torch.ones(8, 8, dtype=torch.double)] * 4)
    torch.testing.assert_close(fitted.to_dense(), w * mask)


def test_nm_mask_keeps_n_of_every_m():
    layer = make(S("nm", n=2, m=4), 64, 16)
    nz = (layer.to_dense() != 0).reshape(16, 16, 4).sum(-1)
    assert (nz == 2).all()


def test_nm_srste_decays_pruned_weights():
    layer = make(S("nm", n=2, m=4, decay=0.1), 8, 4)
    x = torch.zeros(1, 8, dtype=torch.double)
    layer(x).sum().backward()  # zero data gradient
    assert (layer.weight.grad == 0).all()  # the backward is the plain straight-through one
    layer.regularize_grad()  # once per optimizer step: only the SR-STE term
    dense = layer.to_dense().detach()
    pruned = dense == 0
    torch.testing.assert_close(layer.weight.grad[pruned], 0.1 * layer.weight.detach()[pruned])
    assert (layer.weight.grad[~pruned] == 0).all()


def test_blocksparse_kept_blocks_product_equals_the_masked_product(monkeypatch):
    """The kept-blocks product (what a sparse enough block mask runs) against ``x @ (W * mask)^T``: output, input
    gradient and weight gradient (zero on pruned blocks), including block-rows and -columns with no kept block."""
    from kernels.blocksparse import blocksparse_linear

    monkeypatch.setenv("STRUCTORCH_KERNELS", "reference")
    layer = make(S("blocksparse", block_size=8, density=0.25), 48, 32)
    layer.mask[1] = False
    layer.mask[:, 2] = False
    x = torch.randn(2, 7, 48, dtype=torch.double, requires_grad=True)
    gy = torch.randn(2, 7, 32, dtype=torch.double)
    ref = torch.autograd.grad(x @ layer.masked_weight().t(), (x, layer.weight), gy)
    y = blocksparse_linear(x, layer.weight, layer.mask, 8)
    got = torch.autograd.grad(y, (x, layer.weight), gy)
    torch.testing.assert_close(y, x @ layer.to_dense().t())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_nm_phases_change_what_the_layer_applies():
    layer = make(S("nm", n=1, m=4), 16, 8)
    layer.enable_schedule(freeze=True)
    w = layer.weight.detach()
    layer.set_phase(dense=True, n_now=4, pruned_scale=1.0, freeze=False)
    torch.testing.assert_close(layer.to_dense(), w)
    assert layer.prune_units() == (128, 128, 1)
    layer.set_phase(dense=False, n_now=2, pruned_scale=0.25, freeze=False)  # SDGF 2:4, MDGF a = 0.25
    kept = (layer.to_dense() == w).reshape(8, 4, 4).sum(-1)
    assert (kept == 2).all() and layer.prune_units() == (128, 128, 1)
    torch.testing.assert_close(layer.to_dense()[layer.to_dense() != w], 0.25 * w[layer.to_dense() != w])
    layer.set_phase(dense=False, n_now=1, pruned_scale=0.0, freeze=True)  # frozen 1:4
    mask = layer.frozen_mask.clone()
    assert layer.prune_units() == (32, 128, 1) and int(mask.sum()) == 32
    with torch.no_grad():
        layer.weight.mul_(-torch.rand_like(layer.weight))  # new magnitudes: a following mask would move
    torch.testing.assert_close(layer.to_dense(), layer.weight * mask)
    x = torch.randn(3, 16, dtype=torch.double)
    layer(x).sum().backward()
    assert (layer.weight.grad[~mask] == 0).all()  # frozen: only kept weights train, no SR-STE term
    layer.regularize_grad()
    assert (layer.weight.grad[~mask] == 0).all()


@pytest.mark.parametrize(
    "spec,shape,match",
    [
        (S("blockdiag", blocks=5), (64, 64), r"blockdiag.blocks=5 must divide in_features=64.*allowed: \[1, 2, 4"),
        (S("monarch", blocks=3), (64, 96), r"monarch.blocks=3 must divide"),
        (S("blast", blocks=4, rank=0), (64, 64), r"blast.rank=0 must lie in"),
        (S("lowrank", rank=100), (64, 32), r"lowrank.rank=100 must lie in \[1, 32\]"),
        (S("blocksparse", block_size=8, density=1.5), (64, 64), r"density=1.5"),
        (S("nm", n=3, m=5), (64, 64), r"nm.m=5 must divide"),
        (S("lowrank"), (64, 64), r"required field\(s\) \['rank'\]"),
        (S("dense", rank=4), (64, 64), r"\['rank'\] do not apply"),
        (S("sparse_lowrank", rank=4, init="lora"), (64, 64), r"sparse_lowrank.init='lora'; allowed: variance, sltrain"),
        (S("sparse_lowrank", rank=4, alpha=8), (64, 64), r"sparse_lowrank.alpha applies to init: sltrain only"),
        (S("butterfly"), (64, 64), r"'butterfly' is not a registered structure; allowed: \["),
    ],
)
def test_bad_specs_name_field_and_allowed_values(spec, shape, match):
    with pytest.raises(StructureError, match=match):
        build_linear(spec, *shape)


def test_monarch_square_classic_parameter_count():
    layer = make(S("monarch", blocks=16), 256, 256)
    assert layer.num_params() == 2 * 256 * int(math.sqrt(256))
