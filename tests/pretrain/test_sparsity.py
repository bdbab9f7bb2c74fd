"""Sparse pretraining: the gmp schedule's densities, exact thresholds, accounting, resume, bad rules."""

import math
import re

import pytest
import torch

from pretrain.config import ConfigError, SparsityRule, load_config
from pretrain.metrics import read_metrics
from pretrain.sparsity import (
    boundaries,
    gmp_density,
    guide_draw,
    guide_scale,
    is_update_step,
    kth_largest_bits,
    nm_phase,
)
from pretrain.train import main
from tests.conftest import RECIPE, cli, tiny_overrides

RULE = "{select: default, target: 0.25, start: 0.25, end: 0.75, interval: 3}"


def test_cubic_schedule_and_update_steps():
    rule = SparsityRule(target=0.2, start=0.25, end=0.75, interval=10)
    assert boundaries(rule, 100) == (25, 75)
    assert gmp_density(rule, 100, 0) == gmp_density(rule, 100, 25) == 1.0
    assert gmp_density(rule, 100, 50) == pytest.approx(0.2 + 0.8 * 0.5**3)
    assert gmp_density(rule, 100, 75) == gmp_density(rule, 100, 99) == 0.2
    assert [s for s in range(100) if is_update_step(rule, 100, s)] == [25, 35, 45, 55, 65, 75]


def test_kth_largest_by_bisection_equals_topk():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(37, 11, generator=gen) ** 3, torch.rand(5, generator=gen), torch.zeros(8)]
    k = torch.tensor([100, 5, 1])
    bits = kth_largest_bits(scores, k, ())
    for s, kk, b in zip(scores, k.tolist(), bits.tolist()):
        kth = s.flatten().topk(kk).values[-1]
        assert b == int(kth.view(torch.int32)), (kk, b)
        kept = int((s.view(torch.int32) >= b).sum())
        assert kept == (kk if s.unique().numel() == s.numel() else s.numel())  # ties at the threshold: all kept


def straight_and_resumed(store, tmp_path, over: dict, stop: int) -> tuple[dict, dict, object]:
    """The same run straight through and stopped after ``stop`` steps then resumed: both runs' metrics by step,
    and the straight run's directory."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(cli(tiny_overrides(store, straight, **over))) == 0
    assert main(cli(tiny_overrides(store, split, **over, **{"train.exit_after_steps": stop}))) == 0
    assert main([*cli(tiny_overrides(store, split, **over)), "--resume", "auto"]) == 0
    return read_metrics(straight / "metrics.jsonl"), read_metrics(split / "metrics.jsonl"), straight


def _run(args, out, extra=()):
    return main(cli([*args(out), *extra]))


@pytest.fixture
def gmp_args(tiny_store):
    def make(out, **extra):
        over = {"train.steps": 20, "checkpoint.interval": 10, "sparsity.rules": f"[{RULE}]", **extra}
        return tiny_overrides(tiny_store, out, **over)
    return make


def test_gmp_masks_follow_the_schedule_exactly_and_accounting_adds_up(gmp_args, tmp_path):
    run = tmp_path / "run"
    assert _run(gmp_args, run, []) == 0
    rec = read_metrics(run / "metrics.jsonl")
    rule = SparsityRule(target=0.25, start=0.25, end=0.75, interval=3)
    updates = [s for s in range(20) if is_update_step(rule, 20, s)]
    assert updates == [5, 8, 11, 14, 15]
    # per-projection densities, logged at the step that ran with the new masks (index s -> logged s + 1)
    from model.config import ModelConfig

    cfg = load_config(RECIPE, gmp_args(run))
    m: ModelConfig = cfg.model
    sizes = {"q": m.d_model * m.d_model, "k": m.d_model * m.kv_heads * m.head_dim,
             "v": m.d_model * m.kv_heads * m.head_dim, "o": m.d_model * m.d_model, "gate": m.d_model * m.d_ff,
             "up": m.d_model * m.d_ff, "down": m.d_model * m.d_ff}
    for s in updates:
        d = gmp_density(rule, 20, s)
        logged = {k.rsplit("/", 1)[1]: v for k, v in rec[s + 1].items() if k.startswith("sparsity/density/")}
        assert len(logged) == 7 * m.n_layers
        for name, density in logged.items():
            units = sizes[name.rsplit(".", 1)[1]]
            assert density * units == pytest.approx(max(1, round(d * units)), abs=1e-6), (s, name)
    assert rec[20]["sparsity/density"] == pytest.approx(0.25, abs=1e-4)
    # the average of the per-step effective parameter counts, and the FLOPs at each step's density
    params = [rec[s]["sparsity/params"] for s in range(1, 21)]
    assert rec[20]["sparsity/avg_params"] == pytest.approx(sum(params) / 20)
    assert params[0] > params[-1] and rec[20]["sparsity/flops_spent"] > 0


def test_resume_mid_schedule_gives_identical_losses_and_masks(gmp_args, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(gmp_args, straight) == 0
    assert _run(gmp_args, split, ["train.exit_after_steps=10"]) == 0  # between updates 8 and 11
    assert main([*cli(gmp_args(split)), "--resume", "auto"]) == 0
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    for s in range(1, 21):
        assert a[s]["train/loss"] == b[s]["train/loss"], s
        assert {k: v for k, v in a[s].items() if k.startswith("sparsity/")} == \
               {k: v for k, v in b[s].items() if k.startswith("sparsity/")}, s
    from pretrain.checkpoint import load_model

    ma, _, _ = load_model(straight / "checkpoints")
    mb, _, _ = load_model(split / "checkpoints")
    masks = {k: v for k, v in ma.state_dict().items() if k.endswith(".mask")}
    assert len(masks) == 14 and all(torch.equal(v, mb.state_dict()[k]) for k, v in masks.items())


@pytest.mark.parametrize(
    "rules,message",
    [
        ("[{target: 0}]", r"sparsity.rules\[0\].target=0.0 must lie in \(0, 1\]"),
        ("[{target: 1.5}]", r"target=1.5 must lie in \(0, 1\]"),
        ("[{start: 0.5, end: 0.5}]", r"start=0.5 and end=0.5 need 0 <= start < end <= 1"),
        ("[{select: ffn}]", r"sparsity.rules\[0\].select='ffn'; allowed:"),
        ("[{select: mlp}, {select: up}]", r"rules\[1\].select='up' selects the up projections, already"),
        ("[{method: magic}]", r"method='magic' is not allowed; allowed: \['gmp', 'nm', 'self_guided', 'dense_to_struc"),
        ("[{method: nm}]", r"rules\[0\]: method nm schedules nm projections; the q projections are dense"),
        ("[{mask_decay: exp}]", r"rules\[0\]: mask_decay and structure_decay belong to method nm, not gmp"),
        ("[{method: nm, select: mlp, structure_decay: true}]", r"rules\[0\].structure_decay reaches the final n:m"),
        ("[{method: nm, select: mlp, mask_decay: linear, decay_coef: -1}]", r"decay_coef=-1.0 must be positive"),
        ("[{method: self_guided}]", r"rules\[0\]: method self_guided guides structured projections with a dense "
                                    r"path; the q projections are dense"),
        ("[{method: dense_to_structured, select: mlp}]", r"method dense_to_structured converts dense projections"),
        ("[{method: block_size_search, block_sizes: [8, 12]}]", r"block_sizes=\[8, 12\]: positive integers, each a "),
        ("[{method: block_size_search, start: 0.0}]", r"rules\[0\].start=0.0 leaves no search window"),
        ("[{method: block_size_search, block_sizes: [8, 128]}]", r"block_sizes: 128 does not divide the q projections"),
        ("[{granularity: nm, m: 4, target: 0.3}]", r"granularity nm keeps target \* m = 0.3 \* 4 weights per group"),
        ("[{granularity: nm, target: 0.5}]", r"granularity nm needs m \(the group size\)"),
        ("[{granularity: nm, m: 4, target: 0.5, scope: global}]", r"scope=global: granularity nm selects within"),
        ("[{stochastic: true}]", r"rules\[0\].stochastic belongs to method self_guided, not gmp"),
        ("[{granularity: block}]", r"block_size is required for granularity block"),
        ("[{granularity: block, block_size: 5}]", r"dense.block_size=5 must divide"),
        ("[{interval: 0}]", r"interval=0 must be a positive integer"),
    ],
)
def test_bad_rules_stop_before_any_work(rules, message, tiny_store, tmp_path, capsys):
    over = tiny_overrides(tiny_store, tmp_path / "run", **{"sparsity.rules": rules})
    assert main(cli(over)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_rule_on_a_structure_it_cannot_prune_is_refused(tiny_store, tmp_path):
    over = tiny_overrides(tiny_store, tmp_path / "run", **{"model.structure": "{mlp: {kind: lowrank, rank: 8}}",
                                                           "sparsity.rules": "[{select: mlp}]"})
    with pytest.raises(ConfigError, match=r"does not apply to the lowrank gate projections; it prunes \['dense'\]"):
        load_config(RECIPE, over)


def test_nm_phases_follow_the_progressive_gradient_flow_formulas():
    rule = SparsityRule(method="nm", start=0.1, end=0.9, mask_decay="linear", structure_decay=True)
    # dense warm-up to t0 = 10; 1:8 decays in ceil(log2 8) = 3 frames of 80/3 steps: 7:8, 4:8, 2:8; fixed 1:8 from 90
    phases = [nm_phase(rule, 100, s, 1, 8) for s in range(100)]
    assert all(p[0] for p in phases[:10]) and not any(p[0] for p in phases[10:])
    assert [p[1] for p in phases[10:90]] == [7] * 27 + [4] * 27 + [2] * 26
    assert [p[2] for p in phases[10:90]] == pytest.approx([max(0.0, 1 - s / 80) for s in range(80)])
    assert all(p == (False, 1, 0.0, True) for p in phases[90:])
    exp = SparsityRule(method="nm", start=0.0, end=1.0, mask_decay="exp", decay_coef=0.1)
    assert [nm_phase(exp, 50, s, 2, 4) for s in (0, 10, 49)] == [
        (False, 2, 1.0, False), (False, 2, pytest.approx(math.exp(-1.0)), False),
        (False, 2, pytest.approx(math.exp(-4.9)), False)]
    srste = SparsityRule(method="nm", start=0.0, end=1.0)  # defaults: SR-STE from the first step, never frozen
    assert {nm_phase(srste, 50, s, 2, 4) for s in range(50)} == {(False, 2, 0.0, False)}


NM = {"model.structure": "{default: {kind: dense}, mlp: {kind: nm, n: 1, m: 8}}", "train.steps": 20,
      "sparsity.rules": "[{method: nm, select: mlp, start: 0.1, end: 0.8, mask_decay: exp, structure_decay: true}]"}


def test_nm_schedule_runs_its_phases_resumes_exactly_and_freezes_the_mask(tiny_store, tmp_path):
    a, b, straight = straight_and_resumed(tiny_store, tmp_path, NM, 10)
    for s in range(1, 21):
        assert a[s]["train/loss"] == b[s]["train/loss"], s
        assert {k: v for k, v in a[s].items() if k.startswith("sparsity/")} == \
               {k: v for k, v in b[s].items() if k.startswith("sparsity/")}, s
    # step s is logged as record s + 1: dense to step 2, 7:8 (frames of 14/3 steps), 4:8, 2:8, fixed 1:8 from 16
    rule = SparsityRule(method="nm", start=0.1, end=0.8, mask_decay="exp", structure_decay=True)
    for s in range(20):
        dense, n_now, scale, _ = nm_phase(rule, 20, s, 1, 8)
        density = 1.0 if dense or scale > 0 else n_now / 8
        assert a[s + 1]["sparsity/density"] == pytest.approx(density), s
        assert a[s + 1]["sparsity/nm_pruned_scale"] == pytest.approx(scale), s
    # params: the mlp projections count fully while dense or decaying, 1/8 once fixed
    assert a[1]["sparsity/params"] > a[20]["sparsity/params"]
    from pretrain.checkpoint import load_model

    ma, _, _ = load_model(straight / "checkpoints")
    mb, _, _ = load_model(tmp_path / "split" / "checkpoints")
    for name, layer in ma.structured_layers().items():
        if name.split(".")[-1] in ("gate", "up", "down"):
            other = mb.structured_layers()[name]
            assert layer.phase() == other.phase() == (False, 1, 0.0, True)
            assert torch.equal(layer.frozen_mask, other.frozen_mask)
            assert int(layer.frozen_mask.sum()) * 8 == layer.frozen_mask.numel()
            assert torch.equal(layer.to_dense(), layer.weight * layer.frozen_mask)


def test_guide_weight_follows_cosine_and_linear_decay():
    cos = SparsityRule(method="self_guided", start=0.1, end=0.5)
    lin = SparsityRule(method="self_guided", start=0.0, end=0.5, guide_decay="linear")
    assert [guide_scale(cos, 100, s) for s in (0, 10, 30, 50, 99)] == pytest.approx([1, 1, 0.5, 0, 0])
    assert guide_scale(cos, 100, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [guide_scale(lin, 100, s) for s in (0, 10, 25, 50)] == pytest.approx([1, 0.8, 0.5, 0])
    draws = [guide_draw(0, s, "layers.0.mlp.up") for s in range(2000)]
    assert draws == [guide_draw(0, s, "layers.0.mlp.up") for s in range(2000)]  # a pure function
    assert 0.45 < sum(draws) / len(draws) < 0.55 and min(draws) >= 0 and max(draws) < 1
    assert guide_draw(0, 5, "layers.0.mlp.up") != guide_draw(0, 5, "layers.1.mlp.up")


GUIDED = {"model.structure": "{default: {kind: dense}, mlp: {kind: lowrank, rank: 8}}", "train.steps": 20,
          "checkpoint.interval": 4, "checkpoint.keep": 0,
          "sparsity.rules": "[{method: self_guided, select: mlp, start: 0.1, end: 0.5, stochastic: true}]"}


def test_self_guided_mixes_then_frees_the_guide_and_resumes_exactly(tiny_store, tmp_path):
    """Guide weight 1 to step 2, cosine to 0 at step 10, where the guides are freed; stopped at step 12 (after
    the free) and resumed: the same losses as straight through, and checkpoints hold guides only while live."""
    a, b, straight = straight_and_resumed(tiny_store, tmp_path, GUIDED, 12)
    rule = SparsityRule(method="self_guided", start=0.1, end=0.5)
    for s in range(1, 21):
        assert a[s]["train/loss"] == b[s]["train/loss"], s
        assert a[s]["sparsity/guide_scale"] == pytest.approx(guide_scale(rule, 20, s - 1)), s
    guides = 3 * 64 * 192 * 2  # gate, up, down per layer
    assert a[10]["sparsity/params"] - a[11]["sparsity/params"] == guides == a[10]["sparsity/guide_params"]
    assert a[11]["sparsity/guide_params"] == 0
    from pretrain.checkpoint import load_model

    live, _, _ = load_model(straight / "checkpoints" / "step_000008")
    held = [k for k in live.state_dict() if k.endswith(".guide")]
    assert len(held) == 6
    freed, _, _ = load_model(straight / "checkpoints" / "step_000012")
    assert not [k for k in freed.state_dict() if "guide" in k]
    for layer in live.structured_layers().values():  # eval applies a G + (1 - a) S while a > 0
        if layer.guide is not None:
            a8 = guide_scale(rule, 20, 7)
            torch.testing.assert_close(layer.applied_dense(), a8 * layer.guide + (1 - a8) * layer.to_dense())
            x = torch.randn(3, layer.in_features)
            torch.testing.assert_close(layer(x), x @ layer.applied_dense().t(), rtol=1e-5, atol=1e-6)


def test_guide_starts_equal_to_its_structured_layer():
    from model.config import StructureSpec
    from model.structured import build_linear

    layer = build_linear(StructureSpec("monarch", blocks=4), 32, 48)
    layer.reset_parameters(0.02, torch.Generator().manual_seed(0))
    x = torch.randn(5, 32)
    before = layer(x)
    layer.enable_guide()
    torch.testing.assert_close(layer(x), before)  # G = to_dense() at a = 1
    assert layer.guide.shape == (48, 32) and layer.num_params() == 4 * (32 + 48)  # the structure's own count
    layer.set_guide(0.25, True)
    torch.testing.assert_close(layer(x), before)  # still equal: G has not moved
    with torch.no_grad():
        layer.guide.zero_()
    torch.testing.assert_close(layer(x), 0.75 * before)
    layer.set_guide(0.25, False)  # the stochastic mode's off step: the structured path alone
    torch.testing.assert_close(layer(x), before)
    layer.free_guide()
    assert layer.guide is None and "guide" not in dict(layer.named_parameters())
    torch.testing.assert_close(layer(x), before)


D2S = {"model.structure": "{default: {kind: dense}, mlp: {kind: lowrank, rank: 8}, "
                          "o: {kind: blast, blocks: 4, rank: 8}}",
       "train.steps": 20, "checkpoint.interval": 4, "checkpoint.keep": 0,
       "sparsity.rules": "[{method: dense_to_structured, select: mlp}, {method: dense_to_structured, select: o, "
                         "start: 0.3}]"}


@pytest.mark.parametrize("stop", [8, 10])
def test_dense_to_structured_converts_logs_errors_and_resumes_exactly(stop, tiny_store, tmp_path):
    """o trains dense to step 6 and mlp to step 10, then each continues as its structure from from_dense; stopped
    between the conversions or exactly at the checkpoint written just before one, and resumed: the same losses."""
    a, b, straight = straight_and_resumed(tiny_store, tmp_path, D2S, stop)
    assert all(a[s]["train/loss"] == b[s]["train/loss"] for s in range(1, 21))
    errors = {s: {k: v for k, v in a[s].items() if "projection_error" in k} for s in range(1, 21)}
    assert sorted(s for s, e in errors.items() if e) == [7, 11]  # logged with the step that converted (6, 10)
    assert len(errors[7]) == 2 and len(errors[11]) == 6 and all(0 < v < 1 for v in errors[11].values())
    d, f = 64, 192
    assert a[6]["sparsity/params"] - a[7]["sparsity/params"] == 2 * (d * d - (8 * 2 * d + 4 * 4 * 8))  # blast o
    assert a[10]["sparsity/params"] - a[11]["sparsity/params"] == 2 * 3 * (d * f - 8 * (d + f))  # lowrank mlp
    from pretrain.checkpoint import load_model

    before, _, _ = load_model(straight / "checkpoints" / "step_000008")
    after, _, _ = load_model(straight / "checkpoints" / "step_000012")
    kinds = {n: (before.structured_layers()[n].name, after.structured_layers()[n].name)
             for n in ("layers.0.attn.o", "layers.0.mlp.up", "layers.0.attn.q")}
    assert kinds == {"layers.0.attn.o": ("blast", "blast"), "layers.0.mlp.up": ("dense", "lowrank"),
                     "layers.0.attn.q": ("dense", "dense")}


def test_block_size_search_finds_the_planted_block_size():
    """Weights living on 16 x 16 blocks: 8 and 16 retain all the energy at the planted density, 32 does not; the
    largest candidate within tolerance of the smallest is 16, and gmp then prunes whole 16-blocks."""
    from model.config import StructureSpec
    from model.structured import build_linear
    from pretrain.sparsity import SparsitySchedule, enable_pruning

    gen = torch.Generator().manual_seed(0)
    layers = {}
    for name in ("layers.0.mlp.up", "layers.1.mlp.up"):
        layer = build_linear(StructureSpec("dense"), 64, 128)
        planted = torch.rand(8, 4, generator=gen) < 0.25
        planted[0, 0] = True
        with torch.no_grad():
            layer.weight.copy_(torch.randn(128, 64, generator=gen) * planted.repeat_interleave(16, 0)
                               .repeat_interleave(16, 1))
        layers[name] = layer
    kept = sum(int((layers[n].weight != 0).sum()) for n in layers) / (2 * 128 * 64)
    rule = SparsityRule(method="block_size_search", select="up", block_sizes=[8, 16, 32], target=kept, start=0.5,
                        end=0.6, interval=1, scope="global")
    enable_pruning(layers, [rule])
    sched = SparsitySchedule([rule], 10, layers, None, None, params=0, forward_flops=0, tokens_per_step=1)
    for step in range(5):
        out = sched.update(step)
        assert out["sparsity/block_search/8"] == pytest.approx(1.0) == out["sparsity/block_search/16"]
        assert out["sparsity/block_search/32"] < 0.95
    out = sched.update(5)
    assert out["sparsity/block_size"] == 16 and all(int(m.prune_block_size) == 16 for m in layers.values())
    sched.update(6)  # t1: gmp at the target density, by 16-blocks
    for layer in layers.values():
        assert torch.equal(layer.mask, layer.weight.detach().ne(0).reshape(16, 8, 8, 8).any(3).any(1))
    assert sched.metrics()["sparsity/density"] == pytest.approx(kept)


SEARCH = {"train.steps": 20, "checkpoint.interval": 4, "checkpoint.keep": 0,
          "sparsity.rules": "[{method: block_size_search, select: mlp, block_sizes: [32, 8, 16], target: 0.3, "
                            "start: 0.3, end: 0.7, interval: 2, scope: global}]"}


def test_block_size_search_logs_decides_and_resumes_mid_search_exactly(tiny_store, tmp_path):
    a, b, straight = straight_and_resumed(tiny_store, tmp_path, SEARCH, 4)
    assert all(a[s]["train/loss"] == b[s]["train/loss"] for s in range(1, 21))
    scored = [s - 1 for s in range(1, 21) if "sparsity/block_search/8" in a[s]]
    assert scored == [0, 2, 4, 6]  # every interval before t0 = 6, and the decision at 6
    means = {bs: a[7][f"sparsity/block_search/{bs}"] for bs in (8, 16, 32)}
    assert means == {bs: b[7][f"sparsity/block_search/{bs}"] for bs in (8, 16, 32)}
    chosen = max(bs for bs, r in means.items() if r >= 0.95 * means[8])
    assert a[7]["sparsity/block_size"] == chosen and a[20]["sparsity/density"] == pytest.approx(0.3, abs=0.01)
    from pretrain.checkpoint import load_model

    model, _, _ = load_model(straight / "checkpoints")
    for name, layer in model.structured_layers().items():
        if name.split(".")[-1] in ("gate", "up", "down"):
            k = chosen // 8
            assert int(layer.prune_block_size) == chosen
            assert torch.equal(layer.mask, layer.mask[::k, ::k].repeat_interleave(k, 0).repeat_interleave(k, 1))


def test_gmp_at_nm_granularity_decays_n_per_group_and_shards_exactly():
    """8:8 -> 2:8 on the cubic schedule: round(d(t) * 8) weights kept in every group of 8 inputs; a row-split
    shard (whole groups) selects exactly the full layer's mask slice."""
    from model.config import StructureSpec
    from model.structured import build_linear
    from pretrain.sparsity import SparsitySchedule, enable_pruning

    rule = SparsityRule(target=0.25, m=8, granularity="nm", start=0.0, end=0.5, interval=2)
    layer = build_linear(StructureSpec("dense"), 64, 16)
    layer.reset_parameters(0.02, torch.Generator().manual_seed(0))
    layers = {"layers.0.mlp.down": layer}
    enable_pruning(layers, [rule])

    class Comm:
        rank, size = 0, 2

        def reduce(self, t):
            return t

    shards = [layer.shard(r, 2, "row", Comm()).layer for r in range(2)]
    sched = SparsitySchedule([rule], 20, layers, None, None, params=0, forward_flops=0, tokens_per_step=1)
    for step in range(12):
        sched.update(step)
        if is_update_step(rule, 20, step):
            n = max(2, round(gmp_density(rule, 20, step) * 8))
            assert (layer.mask.reshape(16, 8, 8).sum(-1) == n).all(), step
            for r, shard in enumerate(shards):
                shard.set_group_mask(n, 8)
                assert torch.equal(shard.mask, layer.mask.chunk(2, 1)[r]), step
                with torch.no_grad():
                    shard.weight.copy_(layer.weight.chunk(2, 1)[r])
    assert sched.metrics()["sparsity/density"] == 0.25
