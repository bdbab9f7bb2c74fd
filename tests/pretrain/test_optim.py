"""The block-wise optimizers on one process: AdamW is torch's AdamW, GaLore's projections, mL-BFGS on a
convex problem, ownership balance, and a tiny GPT trained with each recipe."""

from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.optim import AdamW, GaLore, MomentumLBFGS, assign_owners, dct_basis, ownership_report
from pretrain.train import Trainer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).parents[2]


def params(seed=0, shapes=((12, 8), (8,), (3, 6, 10))):
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g))) for i, s in enumerate(shapes)]


def groups(named, wd=0.1):
    ps = [p for _, p in named]
    return [{"params": ps[:1] + ps[2:], "weight_decay": wd, "role": "matrix"},
            {"params": ps[1:2], "weight_decay": 0.0, "role": "norm"}]


def grads(named, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for _, p in named]


def same_steps_as_torch(opt, ours, torch_opt, ref) -> None:
    """Five steps of both optimizers on the same gradients leave the same parameters."""
    for step in range(5):
        for (_, p), (_, q), g in zip(ours, ref, grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for (_, p), (_, q) in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_matches_torch_adamw():
    ours, ref = params(), params()
    opt = AdamW(ours, groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    same_steps_as_torch(opt, ours, torch_opt, ref)


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.0, False), (0.9, 0.0, True), (0.0, 0.0, False)])
def test_sgd_matches_torch_sgd(momentum, dampening, nesterov):
    from pretrain.optim import SGD

    ours, ref = params(), params()
    opt = SGD(ours, groups(ours, wd=0.0), lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov)
    torch_opt = torch.optim.SGD(groups(ref, wd=0.0), lr=0.05, momentum=momentum, dampening=dampening,
                                nesterov=nesterov)
    same_steps_as_torch(opt, ours, torch_opt, ref)


def test_dct_basis_is_exactly_orthogonal_and_picks_aligned_columns():
    for k in (8, 64, 96):
        d = dct_basis(k, torch.float64)
        torch.testing.assert_close(d.T @ d, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    # a gradient built from DCT columns 3 and 5 selects exactly those at rank 2
    d = dct_basis(16)
    w = torch.nn.Parameter(torch.zeros(40, 16))
    opt = GaLore([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1e-2, rank=2, update_gap=1,
                 projection="dct")
    w.grad = torch.randn(40, 1) * d[:, 3] + 0.5 * torch.randn(40, 1) * d[:, 5]
    opt.step()
    assert opt.state[w]["proj"].tolist() == [3, 5]


def test_galore_full_rank_is_adamw_in_the_projected_basis():
    """At full rank the DCT projector is a fixed rotation Q, so GaLore on W is exactly AdamW on W Q (scale 1).

    (Not AdamW on W itself: Adam's elementwise normalisation does not commute with rotations, so no
    orthogonal projection can reproduce it; at full rank GaLore is lossless, P P^T = I.)"""
    m, n, steps = 24, 16, 4
    w = torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(0)))
    q = dct_basis(n)
    wq = torch.nn.Parameter((w.detach() @ q).clone())
    galore = GaLore([("w", w)], [{"params": [w], "weight_decay": 0.1}], lr=1e-2, rank=n, update_gap=1,
                    scale=1.0, projection="dct")
    adam = AdamW([("wq", wq)], [{"params": [wq], "weight_decay": 0.1}], lr=1e-2)
    for step in range(steps):
        g = torch.randn(m, n, generator=torch.Generator().manual_seed(10 + step))
        w.grad, wq.grad = g, g @ q
        galore.step()
        adam.step()
        assert galore.state[w]["proj"].tolist() == list(range(n))
    torch.testing.assert_close(w.detach() @ q, wq.detach(), rtol=1e-5, atol=1e-6)


def test_galore_svd_projector_at_full_rank_is_lossless():
    w = torch.nn.Parameter(torch.zeros(20, 12))
    opt = GaLore([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1e-2, rank=12, update_gap=1)
    w.grad = torch.randn(20, 12)
    opt.step()
    qm = opt.state[w]["proj"]
    torch.testing.assert_close(qm @ qm.T, torch.eye(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(w.grad @ qm @ qm.T, w.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("projection,bound", [("dct", 1.01), ("svd", 1.51)])
def test_galore_state_is_about_r_over_n_of_adamw(projection, bound):
    n, r = 256, 16
    w = torch.nn.Parameter(torch.zeros(n, n))
    galore = GaLore([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1e-2, rank=r, projection=projection)
    adam = AdamW([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1e-2)
    ratio = galore.state_bytes() / adam.state_bytes()
    # two [n, r] moments (+ the [n, r] projector for SVD, r indices for DCT) against two [n, n] moments
    assert ratio <= bound * r / n, ratio


def test_galore_projects_the_smaller_side_and_batches_leading_dims():
    w = torch.nn.Parameter(torch.zeros(4, 8, 32))  # 4 blocks of [8, 32]: project the 8 side
    opt = GaLore([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1e-2, rank=4)
    assert opt.state[w]["sub_avg"].shape == (4, 32, 4) and opt.state[w]["proj"].shape == (4, 8, 4)
    w.grad = torch.randn(4, 8, 32)
    opt.step()
    assert torch.isfinite(w).all() and w.abs().sum() > 0


def _iterations_to_target(make_opt, f, d, steps=3000, target=1e-6):
    w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = make_opt(w)
    f0 = float(f(w.detach()))
    for t in range(steps):
        opt.zero_grad()
        f(w).backward()
        opt.step()
        if float(f(w.detach())) < target * f0:
            return t + 1
    return steps


def test_mlbfgs_needs_clearly_fewer_iterations_than_sgd_momentum_on_a_quadratic():
    """A strongly convex quadratic, condition number 1e4, built in float64 throughout (no float32 kernel whose
    rounding depends on the CPU). Deterministic gradients have no noise to average, so pairs are the raw
    differences of consecutive steps (T = 1, beta = 0, pair momentum 0); damping keeps its defaults (bounds
    0.01 and 1.5, 1% identity), so the preconditioner sees at most about 1e2 of the 1e4 condition number. The
    quasi-Newton step keeps its length
    (``normalize=False``, lr 1): with the reference's global normalisation the step length is set by the LR
    schedule alone, and on a quadratic no schedule we tried beat tuned SGD momentum (see the README)."""
    torch.manual_seed(0)
    d = 50
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(-4, 0, d, dtype=torch.float64)) @ q.T
    wstar = torch.randn(d, dtype=torch.float64)

    def f(w):
        return 0.5 * (w - wstar) @ a @ (w - wstar)

    def mlbfgs(w):
        return MomentumLBFGS([("w", w)], [{"params": [w], "weight_decay": 0.0}], lr=1.0, update_period=1, beta=0.0,
                             pair_momentum=0.0, momentum=0.5, normalize=False, granularity="tensor")

    # the best of a step-size sweep up to heavy ball's stability limit (2 (1 + momentum) / L = 3.8)
    sgd = min(_iterations_to_target(lambda w, lr=lr: torch.optim.SGD([w], lr=lr, momentum=0.9), f, d)
              for lr in (1.0, 2.0, 3.0, 3.5))
    ours = _iterations_to_target(mlbfgs, f, d)
    # measured 188 against 467 here (seeds 1-3: 192/506, 204/622, 207/654)
    assert ours <= 0.6 * sgd, (ours, sgd)


def _mlbfgs(w, **kw):
    return MomentumLBFGS([("w", w)], [{"params": [w], "weight_decay": 0.0}], granularity="tensor", **kw)


@pytest.mark.parametrize("ratio,expected", [(10.0, 1.5), (-1.0, 0.01), (1e-3, 0.99 * 1e-3 + 0.01),
                                            (0.5, 0.99 * 0.5 + 0.01)])
def test_mlbfgs_damping_blends_towards_the_identity_into_the_bounds(ratio, expected):
    """Steps 1 and 2 form the first pair (T = 1, beta = 0: s is the step taken, y the gradient change). A pair's
    curvature s.y/s.s far above 1.5 or below 0.01 ends exactly at the bound; otherwise at least 1% of the identity
    is mixed in (which lifts 1e-3 past the bound)."""
    w = torch.nn.Parameter(torch.zeros(6))
    opt = _mlbfgs(w, lr=0.1, update_period=1, beta=0.0, pair_momentum=0.0)
    g1 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    w.grad = g1.clone()
    opt.step()
    s = -0.1 * g1  # the warm-up step: momentum SGD from a zero buffer
    w.grad = g1 + ratio * s
    opt.step()
    st = opt.state[w]
    torch.testing.assert_close(st["s_hist"][0], s)
    curvature = float(st["s_hist"][0] @ st["y_hist"][0] / (s @ s))
    assert curvature == pytest.approx(expected, rel=1e-5)


def test_mlbfgs_warm_up_is_sgd_momentum_until_the_first_pair():
    """Before step 2T the step is torch's SGD with momentum and L2 weight decay (the reference's warm-up)."""
    ours, ref = params(), params()
    opt = MomentumLBFGS(ours, groups(ours, wd=0.01), lr=0.05, update_period=50)
    same_steps_as_torch(opt, ours, torch.optim.SGD(groups(ref, wd=0.01), lr=0.05, momentum=0.9), ref)
    assert opt.pairs_formed(5) == 0 and opt.pairs_formed(100) == 1


def test_mlbfgs_bf16_history_halves_the_history_bytes():
    w32, w16 = torch.nn.Parameter(torch.zeros(64, 32)), torch.nn.Parameter(torch.zeros(64, 32))
    fp32 = _mlbfgs(w32, lr=0.1, history=10)
    bf16 = _mlbfgs(w16, lr=0.1, history=10, history_dtype=torch.bfloat16)
    n = w32.numel()
    assert fp32.state_bytes() == (5 + 2 * 10) * 4 * n  # five float32 buffers and the (s, y) history
    assert bf16.state_bytes() == 5 * 4 * n + 2 * 10 * 2 * n


@pytest.mark.parametrize("setting,field", [("history=0", "optim.mlbfgs.history"),
                                           ("update_period=0", "optim.mlbfgs.update_period"),
                                           ("min_curvature=2.0", "optim.mlbfgs.min_curvature"),
                                           ("max_curvature=0.5", "optim.mlbfgs.min_curvature"),
                                           ("damping=1.0", "optim.mlbfgs.damping"),
                                           ("granularity=block", "optim.mlbfgs.granularity")])
def test_bad_mlbfgs_settings_name_the_field(setting, field):
    from pretrain.config import UserError

    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs" / "tiny-cpu-mlbfgs.yaml", [f"optim.mlbfgs.{setting}"])


def test_owners_are_unique_and_balanced():
    sizes = {f"b{i}": s for i, s in enumerate([4096] * 8 + [1024] * 16 + [64] * 40)}
    for ranks in (1, 2, 4, 8):
        owners = assign_owners(sizes, ranks)
        assert set(owners) == set(sizes) and set(owners.values()) <= set(range(ranks))
        report = ownership_report(sizes, owners, ranks)
        assert sum(report["elements"]) == sum(sizes.values())
        assert report["imbalance"] < 1.02, report


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny-cpu.yaml", "tiny-cpu-galore.yaml", "tiny-cpu-mlbfgs.yaml",
                                    "tiny-cpu-sgd.yaml"])
def test_tiny_gpt_trains_with_each_optimizer(recipe, tiny_store, tmp_path):
    over = tiny_overrides(tiny_store, tmp_path / "run", **{"train.steps": 100, "train.eval_interval": 100,
                                                          "model.structure": "{default: {kind: lowrank, rank: 16}}",
                                                          "optim.galore.rank": 8})
    cfg = load_config(ROOT / "configs" / recipe, over)
    trainer = Trainer(cfg)
    start = trainer.evaluate()
    end = trainer.fit()["val/loss"]
    assert start - end > 1.0, (recipe, start, end)


def test_resume_refuses_optimizer_state_it_cannot_load(tiny_store, tmp_path):
    from pretrain.checkpoint import CheckpointError

    over = tiny_overrides(tiny_store, tmp_path / "run", **{"train.steps": 10, "optim.name": "galore"})
    Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", over)).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000010"
    with pytest.raises(CheckpointError, match=r"holds galore optimizer state but optim.name=adamw.*load_optimizer"):
        Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml",
                            [*over, "optim.name=adamw", f"checkpoint.resume={ckpt}", "train.steps=12"]))
    fresh = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml",
                                [*over, "optim.name=adamw", f"checkpoint.resume={ckpt}", "train.steps=12",
                                 "checkpoint.load_optimizer=false"]))
    assert fresh.step == 10 and fresh.optimizer.step_count == 0
    trainer = Trainer(load_config(ROOT / "configs" / "tiny-cpu.yaml", [*over, f"checkpoint.resume={ckpt}"]))
    assert trainer.optimizer.step_count == 10
    meta = {"config": {"optim": {"name": "galore"}}, "topology": {"dp": 1, "tp": 2, "pp": 1}}
    with pytest.raises(CheckpointError, match=r"written at parallel.tp=2; galore keeps per-shard state"):
        trainer._check_optimizer_checkpoint(meta, ckpt)
