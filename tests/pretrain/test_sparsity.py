"""Sparse pretraining: the gmp schedule's densities, exact thresholds, accounting, resume, bad rules."""

import re

import pytest
import torch

from pretrain.config import ConfigError, SparsityRule, load_config
from pretrain.metrics import read_metrics
from pretrain.sparsity import boundaries, gmp_density, is_update_step, kth_largest_bits
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
        ("[{method: magic}]", r"sparsity.rules\[0\].method='magic' is not allowed; allowed: \['gmp'\]"),
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
