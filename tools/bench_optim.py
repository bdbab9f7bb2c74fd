"""Compare the block-wise optimizers against AdamW in one run: state bytes, step time, validation loss.

Usage:
    python tools/bench_optim.py                       # tiny-cpu, 200 steps per optimizer, plus the GPT-2-small shape
    python tools/bench_optim.py --steps 100 --optimizers adamw,galore
    python tools/bench_optim.py --big-config configs/gpt2-small-blast.yaml --big-steps 3

Tiny shape: each optimizer's recipe (configs/tiny-cpu.yaml, tiny-cpu-galore.yaml, tiny-cpu-mlbfgs.yaml)
trains ``--steps`` steps on the default corpus; the table gives the optimizer-state bytes per parameter,
the median time of ``optimizer.step()`` and of a whole training step, and the final validation loss, each
with its ratio to AdamW.

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

from pretrain.config import UserError, load_config
from pretrain.optim import OPTIMIZERS, assign_owners, build_optimizer, ownership_report
from pretrain.train import Trainer, build_model
from tools.bench_common import WARMUP_STEPS, quiet_run, ratio, run_records

RECIPES = {"adamw": "configs/tiny-cpu.yaml", "galore": "configs/tiny-cpu-galore.yaml",
           "mlbfgs": "configs/tiny-cpu-mlbfgs.yaml", "sgd": "configs/tiny-cpu-sgd.yaml"}


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


def tiny(name: str, steps: int, out: Path, extra: list[str]) -> dict:
    trainer = Trainer(load_config(RECIPES[name], [*quiet_run(steps, out), *extra]))
    params = sum(p.numel() for _, p in trainer.model.named_parameters())
    state = trainer.optimizer.state_bytes()
    timer = StepTimer(trainer.optimizer)
    result = trainer.fit()
    rec, tok_s = run_records(out)
    tokens = trainer.cfg.train.global_batch * trainer.cfg.data.seq_len
    return {"state_per_param": state / params, "opt_ms": 1e3 * statistics.median(timer.times[WARMUP_STEPS:]),
            "step_ms": 1e3 * tokens / tok_s, "val0": rec[0]["val/loss"], "val": result["val/loss"]}


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
        optim_cfg = load_config(RECIPES[name], []).optim
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--optimizers", default=",".join(RECIPES), help=f"comma list from {list(OPTIMIZERS)}")
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
    try:
        with tempfile.TemporaryDirectory(prefix="bench-optim-") as tmp:
            rows = {n: tiny(n, args.steps, Path(tmp) / n, args.extra) for n in names}
        big_rows, own = big(args.big_config, names, args.big_steps, args.dp) if args.big_config != "none" else ({}, {})
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = rows["adamw"]
    print(f"\ntiny-cpu shape, {args.steps} steps each on the default corpus; ratios to AdamW\n")
    print("| optimizer | state B/param | x adamw | optimizer step ms | x adamw | train step ms | x adamw "
          "| val loss (init) | final val loss | diff vs adamw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['state_per_param']:.2f} | {ratio(r['state_per_param'], a['state_per_param'])} "
              f"| {r['opt_ms']:.1f} | {ratio(r['opt_ms'], a['opt_ms'])} | {r['step_ms']:.1f} "
              f"| {ratio(r['step_ms'], a['step_ms'])} | {r['val0']:.3f} | {r['val']:.3f} "
              f"| {r['val'] - a['val']:+.3f} |")
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
