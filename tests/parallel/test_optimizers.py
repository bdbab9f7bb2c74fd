"""Block ownership over dp (and tp shards) gives the single-process optimizer's parameters; optimizer state
reshards over dp through checkpoints."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.data import reduce_to_owners
from pretrain.config import load_config
from pretrain.optim import AdamW, GaLore, MomentumLBFGS
from pretrain.train import Trainer
from tests.distributed import run
from tests.parallel.common import STRUCTURES, losses, max_rel_diff, tiny, topology, torchrun

# two tensors of layer 0 (one mL-BFGS block at layer granularity), then one block each
SHAPES = {"layers.0.a": (16, 24), "layers.0.b": (24,), "layers.1.c": (4, 8, 12), "layers.2.d": (32, 8),
          "e": (8, 40), "f": (16,)}
NORM = "layers.0.b"


def _mlbfgs(granularity):
    # pairs from step 2 on (T = 1), so four steps exercise pair momentum, damping and the normalised recursion
    def make(named, groups, dp, tp=None):
        tp_group, placements = tp or (None, None)
        return MomentumLBFGS(named, groups, lr=0.05, update_period=1, beta=0.5, granularity=granularity,
                             dp_group=dp, tp_group=tp_group, placements=placements)
    return make


MAKERS = {
    "adamw": lambda named, groups, dp, tp=None: AdamW(named, groups, lr=1e-2, dp_group=dp),
    "galore": lambda named, groups, dp, tp=None: GaLore(named, groups, lr=1e-2, rank=4, update_gap=2,
                                                        projection="svd", dp_group=dp),
    "galore-dct": lambda named, groups, dp, tp=None: GaLore(named, groups, lr=1e-2, rank=4, update_gap=2,
                                                            projection="dct", dp_group=dp),
    "mlbfgs": _mlbfgs("tensor"),
    "mlbfgs-layer": _mlbfgs("layer"),
}
TP_INVARIANT = ("adamw", "mlbfgs", "mlbfgs-layer")
"""Optimizers whose tp shards take exactly the full tensor's update (elementwise, or dot products summed over tp)."""
STEPS = 5


def _tensors(shard=None):
    """The named parameters (each tp rank's dim-0 shard when ``shard=(rank, size)``) and a gradient per
    (step, dp rank) drawn from fixed seeds."""
    named = []
    for i, (name, shape) in enumerate(SHAPES.items()):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        named.append((name, full if shard is None else full.chunk(shard[1], 0)[shard[0]]))
    return named


def _grad(name, step, dp_rank, shard=None):
    i = list(SHAPES).index(name)
    full = torch.randn(SHAPES[name], generator=torch.Generator().manual_seed(1000 * step + 10 * dp_rank + i))
    return full if shard is None else full.chunk(shard[1], 0)[shard[0]]


def _groups(named):
    ps = [p for _, p in named]
    return [{"params": [p for n, p in zip(SHAPES, ps) if n != NORM], "weight_decay": 0.1, "role": "matrix"},
            {"params": [ps[list(SHAPES).index(NORM)]], "weight_decay": 0.0, "role": "norm"}]


def _run_steps(kind, dp_rank, dp_size, dp_group, shard, tp_group):
    named = [(n, torch.nn.Parameter(t.clone())) for n, t in _tensors(shard)]
    tp = (tp_group, dict.fromkeys(SHAPES, 0)) if shard is not None else None
    opt = MAKERS[kind](named, _groups([p for p in named]), dp_group, tp)
    for step in range(STEPS):
        grads = {}
        for n, p in named:
            p.grad = _grad(n, step, dp_rank, shard).clone()
            grads[n] = p.grad
        reduce_to_owners(grads, opt.owners, dp_group, dp_size)
        for n, p in named:
            if opt.owners[n] != dp_rank:
                p.grad = None
        opt.step()
    return {n: p.detach() for n, p in named}, opt


def _reference(kind, dp_size, shard):
    """One process, the mean gradient over the dp ranks, the same blocks (the tp shard's: a block of its own)."""
    named = [(n, torch.nn.Parameter(t.clone())) for n, t in _tensors(shard)]
    opt = MAKERS[kind](named, _groups(named), None)
    for step in range(STEPS):
        for n, p in named:
            p.grad = sum(_grad(n, step, r, shard) for r in range(dp_size)) / dp_size
        opt.step()
    return {n: p.detach() for n, p in named}


def _check(rank, world, tp):
    dp = world // tp
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    dp_group = mesh.get_group("dp")
    dp_rank, tp_rank = dist.get_rank(dp_group), mesh.get_local_rank("tp")
    shard = (tp_rank, tp) if tp > 1 else None
    report = {}
    for kind in MAKERS:
        got, opt = _run_steps(kind, dp_rank, dp, dp_group, shard, mesh.get_group("tp") if tp > 1 else None)
        if shard is None or kind not in TP_INVARIANT:
            ref = _reference(kind, dp, shard)
            for n in SHAPES:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=f"{kind} {n}")
        else:  # the shard's update is the full tensor's
            full = _reference(kind, dp, None)
            for n in SHAPES:
                torch.testing.assert_close(got[n], full[n].chunk(tp, 0)[tp_rank], rtol=1e-5, atol=1e-6,
                                           msg=f"{kind} {n}")
        owned = sorted(n for n in SHAPES if opt.owners[n] == dp_rank)
        report[kind] = {"owners": dict(opt.owners), "owned_state": sorted(
            opt.names[id(p)] for p in opt.state)}
        assert report[kind]["owned_state"] == owned, (kind, owned, report[kind])  # state only on the owner
        blocks = {opt.block_key(n) for n in SHAPES}
        for b in blocks:  # one owner per block
            assert len({opt.owners[n] for n in SHAPES if opt.block_key(n) == b}) == 1, (kind, b)
    return report


@pytest.mark.dist
@pytest.mark.parametrize("world,tp", [(2, 1), (4, 1), (4, 2)])
def test_block_ownership_matches_the_single_process_optimizer(world, tp):
    report = run(_check, world, tp)
    dp = world // tp
    for kind, r in report.items():
        assert set(r["owners"].values()) == set(range(dp)), (kind, r)  # every dp rank owns something
    assert report["mlbfgs-layer"]["owners"]["layers.0.a"] == report["mlbfgs-layer"]["owners"]["layers.0.b"]


OPTIMIZERS = {"adamw": [], "galore": ["optim.galore.rank=4", "optim.galore.update_gap=4"],
              "mlbfgs": ["optim.lr=0.05", "optim.mlbfgs.update_period=3"],
              "sgd": ["optim.lr=0.1", "optim.sgd.nesterov=true"]}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_reshards_over_dp(name, tiny_store, tmp_path):
    """Train 15 steps at dp=1; save at step 10 on dp=4 and resume on dp=2 and dp=1: the same losses."""
    structure = "lowrank"
    base = [*tiny(tiny_store, steps=15), f"optim.name={name}", *OPTIMIZERS[name]]

    def single(out, extra):
        Trainer(load_config(None, [*base, *extra, f"model.structure={{default: {STRUCTURES[structure]}}}",
                                   f"train.out_dir={out / structure}"])).fit()

    single(tmp_path / "ref", [])
    ref = losses(tmp_path / "ref" / structure)
    torchrun(4, tmp_path / "dp4", [structure], [*base, *topology(4, 1, 1), "train.exit_after_steps=10"])
    got = losses(tmp_path / "dp4" / structure)
    assert max_rel_diff(ref, got, range(1, 11)) < 1e-4, "dp=4 does not follow dp=1"
    ckpt = tmp_path / "dp4" / structure / "checkpoints" / "step_000010"
    torchrun(2, tmp_path / "dp2", [structure], [*base, *topology(2, 1, 1)], resume=str(ckpt))
    single(tmp_path / "dp1", [f"checkpoint.resume={ckpt}"])
    for resumed in ("dp2", "dp1"):
        got = losses(tmp_path / resumed / structure)
        assert sorted(got) == list(range(11, 16)), sorted(got)
        diff = max_rel_diff(ref, got, range(11, 16))
        assert diff < 1e-4, f"{name}: dp=4 -> {resumed}: {diff:.2e}"


@pytest.mark.dist
@pytest.mark.slow
def test_mlbfgs_follows_and_reshards_over_tp_and_pp(tiny_store, tmp_path):
    """mL-BFGS's layer blocks sum their dot products over tp and its norm over pp: (dp 1, tp 2, pp 2) follows the
    single process, and its state saved there resumes on dp=2 with the same losses."""
    structure = "lowrank"
    base = [*tiny(tiny_store, steps=15), "optim.name=mlbfgs", *OPTIMIZERS["mlbfgs"]]
    Trainer(load_config(None, [*base, f"model.structure={{default: {STRUCTURES[structure]}}}",
                               f"train.out_dir={tmp_path / 'ref' / structure}"])).fit()
    ref = losses(tmp_path / "ref" / structure)
    torchrun(4, tmp_path / "tp2pp2", [structure], [*base, *topology(1, 2, 2), "train.exit_after_steps=10"])
    assert max_rel_diff(ref, losses(tmp_path / "tp2pp2" / structure), range(1, 11)) < 1e-4
    ckpt = tmp_path / "tp2pp2" / structure / "checkpoints" / "step_000010"
    torchrun(2, tmp_path / "dp2", [structure], [*base, *topology(2, 1, 1)], resume=str(ckpt))
    got = losses(tmp_path / "dp2" / structure)
    assert sorted(got) == list(range(11, 16)), sorted(got)
    assert max_rel_diff(ref, got, range(11, 16)) < 1e-4
