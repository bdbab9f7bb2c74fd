"""Gradual magnitude pruning schedules against dense and static sparsity, from one run each, one table.

Usage:
    python tools/bench_sparsity.py                       # configs/sparse/gmp.yaml, 300 steps, target 0.25
    python tools/bench_sparsity.py --steps 1000 --target 0.5 --set data.paths=[data/stdlib]

Runs, on the same data and initialisation:
- ``dense``: no pruning;
- ``static``: pruned to ``--target`` by magnitude after the first step and fixed (static sparsity at the same
  final parameters);
- ``gmp-early``: the cubic schedule over 0-10% of training (pruning at the start);
- ``gmp-25-75``: the cubic schedule over 25-75% (*The Journey Matters*, arXiv 2501.12486: near-optimal);
- ``gmp-late``: the cubic schedule over 85-95% (pruning at the end).
Each row: final density, final and average parameters (``sparsity/avg_params``), training FLOPs spent, and
the final validation loss against dense and against static. The claim checked is the paper's direction:
gmp-25-75 ends below both gmp-early and gmp-late (and static); the verdict line says reproduced or not.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from pretrain.config import UserError, load_config
from pretrain.train import Trainer
from tools.bench_common import quiet_run, run_records

SCHEDULES = {"static": (0.0, None), "gmp-early": (0.0, 0.1), "gmp-25-75": (0.25, 0.75), "gmp-late": (0.85, 0.95)}
"""name: (start, end) fractions of training; static ends one step after it starts."""


def rules(name: str, target: float, steps: int, interval: int) -> str:
    start, end = SCHEDULES[name]
    end = end if end is not None else 1.0 / steps  # one step: t0 = 0, t1 = 1
    return (f"[{{select: default, method: gmp, target: {target}, start: {start}, end: {end}, "
            f"interval: {interval}}}]")


def run_one(config: str, name: str, args, out_dir: Path) -> dict:
    schedule = "[]" if name == "dense" else rules(name, args.target, args.steps, args.interval)
    over = [*quiet_run(args.steps, out_dir), *args.extra, f"sparsity.rules={schedule}"]
    trainer = Trainer(load_config(config, over))
    result = trainer.fit()
    rec, _ = run_records(out_dir)
    last = rec[args.steps]
    row = {"val": result["val/loss"], "params": trainer.full_params, "avg_params": trainer.full_params,
           "density": 1.0, "flops": 3.0 * trainer.flops["forward"] * args.steps * trainer.cfg.train.global_batch
           * trainer.cfg.data.seq_len}
    if name != "dense":
        row.update(params=last["sparsity/params"], avg_params=last["sparsity/avg_params"],
                   density=last["sparsity/density"], flops=last["sparsity/flops_spent"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sparse/gmp.yaml", help="recipe (its sparsity rules are replaced)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.25, help="final density of every projection, in (0, 1]")
    ap.add_argument("--interval", type=int, default=10, help="steps between mask updates")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = ap.parse_args(argv)
    if not 0.0 < args.target <= 1.0 or args.steps < 20 or args.interval <= 0:
        print(f"error: need 0 < --target <= 1 (got {args.target}), --steps >= 20 (got {args.steps}) and "
              f"--interval > 0 (got {args.interval})", file=sys.stderr)
        return 2
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-sparsity-") as tmp:
        for name in ("dense", *SCHEDULES):
            print(f"-- {name}", file=sys.stderr)
            try:
                rows[name] = run_one(args.config, name, args, Path(tmp) / name)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    dense, static = rows["dense"], rows["static"]
    print(f"\n{args.steps} steps of {args.config}, every projection pruned to density {args.target}; "
          "FLOPs and parameters are the model's (embedding included)\n")
    print("| method | final density | params | avg params | x dense | train FLOPs | x dense | final val loss | "
          "vs dense | vs static |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['density']:.3f} | {r['params']:,.0f} | {r['avg_params']:,.0f} | "
              f"{r['avg_params'] / dense['avg_params']:.2f} | {r['flops']:.3e} | {r['flops'] / dense['flops']:.2f} | "
              f"{r['val']:.4f} | {r['val'] - dense['val']:+.4f} | {r['val'] - static['val']:+.4f} |")
    best = rows["gmp-25-75"]["val"]
    others = {n: rows[n]["val"] for n in ("gmp-early", "gmp-late", "static")}
    verdict = "reproduced" if all(best < v for v in others.values()) else "not reproduced at this scale"
    print(f"\nclaim: gmp over 25-75% of training ends below pruning at the start, at the end and static "
          f"sparsity: {verdict} ({best:.4f} vs " + ", ".join(f"{n} {v:.4f}" for n, v in others.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
