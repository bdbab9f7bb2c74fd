"""Compare the block-wise optimizers on one benchmark: each at its best learning rate from a small sweep.

Usage:
    python tools/bench_optim.py                      # tiny-cpu, 300 steps, every optimizer's LR sweep (~30 min)
    python tools/bench_optim.py --steps 100 --optimizers adamw,mlbfgs --lrs mlbfgs=0.1,0.3
    python tools/bench_optim.py --big-config configs/gpt2-small-blast.yaml --big-steps 3

Tiny shape: every optimizer (its recipe, configs/tiny-cpu*.yaml) trains ``--steps`` steps on the default corpus
at each learning rate of its sweep (``LRS``, or ``--lrs name=a,b,c``); the sweep is printed. At the best
learning rate (lowest final validation loss) the table gives the final validation loss, the steps to reach
AdamW's final validation loss (validation every ``--eval-interval`` steps), the wall time of training (the
median step time times the steps), the optimizer-state bytes per parameter and the median ``optimizer.step()``
time, with ratios to AdamW measured in the same run. The mL-BFGS paper's claim (fewer iterations and less wall
time than SGD and Adam) is then judged: reproduced when mL-BFGS reaches each baseline's final validation loss
in fewer steps and less wall time than the baseline took. ``--plot`` draws the best runs' validation curves.

GPT-2-small shape (``--big-config``, vocabulary 32k): the model is built on CPU, filled with random
gradients and each optimizer is timed over ``--big-steps`` steps (no training: that needs a GPU); it also
reports how the blocks would be owned at ``--dp`` data-parallel ranks (computed, not run).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.config import UserError, load_config
from pretrain.optim import assign_owners, build_optimizer, ownership_report
from pretrain.train import Trainer, build_model
from tools.bench_common import WARMUP_STEPS, quiet_run, ratio, run_records

RECIPES = {"adamw": ("configs/tiny-cpu.yaml", []), "sgd": ("configs/tiny-cpu-sgd.yaml", []),
           "galore-svd": ("configs/tiny-cpu-galore.yaml", ["optim.galore.projection=svd"]),
           "galore-dct": ("configs/tiny-cpu-galore.yaml", ["optim.galore.projection=dct"]),
           "mlbfgs": ("configs/tiny-cpu-mlbfgs.yaml", [])}
"""Benchmark name -> (recipe, overrides)."""
LRS = {"adamw": [1e-3, 3e-3, 1e-2], "sgd": [0.1, 0.3, 1.0], "galore-svd": [3e-3, 1e-2, 3e-2],
       "galore-dct": [3e-3, 1e-2, 3e-2], "mlbfgs": [0.03, 0.1, 0.3, 1.0]}
"""The default learning-rate sweep of each (3-5 values around its recipe's)."""


class StepTimer:
    """Wraps ``optimizer.step`` and records its wall time."""

    def __init__(self, optimizer):
        self.times: list[float] = []
        self._step = optimizer.step
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._step(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out


def tiny(name: str, lr: float, steps: int, eval_interval: int, out: Path, extra: list[str]) -> dict:
    recipe, over = RECIPES[name]
    trainer = Trainer(load_config(recipe, [*over, *quiet_run(steps, out, eval_interval), f"optim.lr={lr}", *extra]))
    params = sum(p.numel() for _, p in trainer.model.named_parameters())
    state = trainer.optimizer.state_bytes()
    timer = StepTimer(trainer.optimizer)
    result = trainer.fit()
    rec, tok_s = run_records(out)
    tokens = trainer.cfg.train.global_batch * trainer.cfg.data.seq_len
    step_ms = 1e3 * tokens / tok_s
    return {"lr": lr, "state_per_param": state / params, "opt_ms": 1e3 * statistics.median(timer.times[WARMUP_STEPS:]),
            "step_ms": step_ms, "wall_s": steps * step_ms / 1e3, "val": result["val/loss"],
            "curve": {s: r["val/loss"] for s, r in sorted(rec.items()) if "val/loss" in r}}


def steps_to(curve: dict[int, float], target: float) -> int | None:
    """First validation step at or below ``target`` (None: never)."""
    return next((s for s, v in curve.items() if v <= target), None)


def verdict(rows: dict, steps: int) -> list[str]:
    """The mL-BFGS paper's claim against each baseline present: fewer steps and less wall time to its final loss."""
    ml = rows["mlbfgs"]
    out = []
    for base in ("sgd", "adamw"):
        if base not in rows:
            continue
        b = rows[base]
        reach = steps_to(ml["curve"], b["val"])
        own = steps_to(b["curve"], b["val"]) or steps
        if reach is None:
            out.append(f"vs {base}: NOT reproduced: mL-BFGS never reaches {base}'s final validation loss "
                       f"{b['val']:.3f} in {steps} steps (it ends at {ml['val']:.3f})")
            continue
        wall = reach * ml["step_ms"] / 1e3
        fewer, faster = reach < own, wall < own * b["step_ms"] / 1e3
        word = "reproduced" if fewer and faster else "NOT reproduced"
        out.append(f"vs {base}: {word}: mL-BFGS reaches {base}'s final {b['val']:.3f} at step {reach} "
                   f"({wall:.0f} s) against {own} steps ({own * b['step_ms'] / 1e3:.0f} s)")
    return out


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        steps = [s for s in r["curve"] if s > 0]
        ax.plot(steps, [r["curve"][s] for s in steps], marker="o", ms=3, label=f"{name} (lr {r['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny-cpu: each optimizer at its best learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def big(config: str, names: list[str], steps: int, dp: int) -> tuple[dict, dict]:
    cfg = load_config(config, ["model.vocab_size=32000"])
    model = build_model(cfg.model, torch.device("cpu"), 0)
    named = list(model.named_parameters())
    params = sum(p.numel() for _, p in named)
    gen = torch.Generator().manual_seed(0)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3)
    rows = {}
    for name in names:
        optim_cfg = load_config(RECIPES[name][0], RECIPES[name][1]).optim
        opt = build_optimizer(optim_cfg, named, model.param_groups(optim_cfg.weight_decay))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        rows[name] = {"state_per_param": opt.state_bytes() / params, "opt_ms": 1e3 * statistics.median(times)}
        del opt
    sizes = {n: p.numel() for n, p in named}
    own = ownership_report(sizes, assign_owners(sizes, dp), dp)
    return rows, {"params": params, "blocks": len(sizes), **own}


def parse_lrs(items: list[str], names: list[str]) -> dict[str, list[float]]:
    lrs = {n: list(LRS[n]) for n in names}
    for item in items:
        name, _, values = item.partition("=")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            parsed = []
        if name not in lrs or not parsed or min(parsed) <= 0:
            raise UserError(f"--lrs {item!r}: want name=lr1,lr2,... with positive learning rates and name one of "
                            f"{names}")
        lrs[name] = parsed
    return lrs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--optimizers", default=",".join(RECIPES), help=f"comma list from {list(RECIPES)}")
    ap.add_argument("--lrs", action="append", default=[], help="name=lr1,lr2,... replaces that optimizer's sweep")
    ap.add_argument("--plot", type=Path, default=Path("runs/bench-optim.png"), help="validation curves; 'none' skips")
    ap.add_argument("--big-config", default="configs/gpt2-small-dense.yaml",
                    help="the GPT-2-small-shape recipe; 'none' skips it")
    ap.add_argument("--big-steps", type=int, default=3)
    ap.add_argument("--dp", type=int, default=8, help="data-parallel ranks for the ownership report")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for the tiny runs")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad or "adamw" not in names:
        print(f"--optimizers: {bad or names} invalid; allowed {list(RECIPES)}, and adamw (the baseline) is required",
              file=sys.stderr)
        return 2
    if args.steps < 1 or not 1 <= args.eval_interval <= args.steps:
        print(f"--steps {args.steps} and --eval-interval {args.eval_interval}: need 1 <= eval-interval <= steps",
              file=sys.stderr)
        return 2
    try:
        lrs = parse_lrs(args.lrs, names)
        sweep: dict[str, list[dict]] = {n: [] for n in names}
        runs = [(n, lr) for n in names for lr in lrs[n]]
        with tempfile.TemporaryDirectory(prefix="bench-optim-") as tmp:
            for i, (n, lr) in enumerate(tqdm(runs, desc="bench_optim", unit="run")):
                sweep[n].append(tiny(n, lr, args.steps, args.eval_interval, Path(tmp) / f"{i}", args.extra))
        big_rows, own = big(args.big_config, names, args.big_steps, args.dp) if args.big_config != "none" else ({}, {})
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\ntiny-cpu shape, {args.steps} steps per run on the default corpus: the learning-rate sweeps "
          "(final validation loss)\n")
    print("| optimizer | " + " | ".join(f"lr {i + 1}" for i in range(max(len(v) for v in lrs.values()))) + " |")
    print("|---|" + "---|" * max(len(v) for v in lrs.values()))
    for n, runs_n in sweep.items():
        print(f"| {n} | " + " | ".join(f"{r['lr']:g}: {r['val']:.3f}" for r in runs_n) + " |")
    rows = {n: min(runs_n, key=lambda r: r["val"]) for n, runs_n in sweep.items()}
    a = rows["adamw"]
    print(f"\neach at its best learning rate; ratios to AdamW; steps to AdamW's final loss {a['val']:.3f} "
          f"(validation every {args.eval_interval} steps)\n")
    print("| optimizer | best lr | final val loss | vs adamw | steps to adamw's final | train wall s | x adamw "
          "| state B/param | x adamw | optimizer step ms | x adamw |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        reach = steps_to(r["curve"], a["val"])
        print(f"| {n} | {r['lr']:g} | {r['val']:.3f} | {r['val'] - a['val']:+.3f} | {reach or 'not reached'} "
              f"| {r['wall_s']:.0f} | {ratio(r['wall_s'], a['wall_s'])} | {r['state_per_param']:.2f} "
              f"| {ratio(r['state_per_param'], a['state_per_param'])} | {r['opt_ms']:.1f} "
              f"| {ratio(r['opt_ms'], a['opt_ms'])} |")
    if "mlbfgs" in rows:
        print("\nthe mL-BFGS paper's claim (fewer iterations and less wall time than SGD and Adam), at this scale:")
        for line in verdict(rows, args.steps):
            print(f"- {line}")
    if str(args.plot) != "none":
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    if big_rows:
        b = big_rows["adamw"]
        print(f"\n{args.big_config} shape (vocab 32k, {own['params']:,} parameters, {own['blocks']} blocks), "
              f"optimizer step on random gradients, CPU\n")
        print("| optimizer | state B/param | x adamw | optimizer step ms | x adamw |")
        print("|---|---|---|---|---|")
        for n, r in big_rows.items():
            print(f"| {n} | {r['state_per_param']:.2f} | {ratio(r['state_per_param'], b['state_per_param'])} "
                  f"| {r['opt_ms']:.0f} | {ratio(r['opt_ms'], b['opt_ms'])} |")
        load = ", ".join(f"{x / 1e6:.2f}M" for x in own["elements"])
        print(f"\nownership at dp={args.dp}: elements per rank {load}; imbalance (max/mean) {own['imbalance']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
