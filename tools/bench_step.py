"""Training-step speed of ``train.compile`` and ``train.activation_checkpointing`` against eager without
recomputation, for a structured recipe and its dense twin, in one run.

Usage:
    python tools/bench_step.py                                  # tiny-cpu and tiny-cpu-dense, 30 steps each
    python tools/bench_step.py --steps 50 --checkpointing none,full --configs configs/tiny-cpu.yaml

Every variant trains the same recipe from the same seed on the same data (``--data``) for ``--steps`` steps.
tokens/s is the median step after the first ``WARMUP_STEPS`` (the compiled runs compile in their first steps;
that time is reported on its own). The loss column is the largest relative difference of the training loss from
the recipe's eager run without recomputation (checkpointing must give 0; compile differs by rounding).
"""

import argparse
import sys
import tempfile
from pathlib import Path

from tools.bench_common import WARMUP_STEPS, quiet_run, ratio, run_records

MODES = ("none", "full", "selective")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="configs/tiny-cpu.yaml,configs/tiny-cpu-dense.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--checkpointing", default=",".join(MODES), help=f"comma list from {list(MODES)}")
    ap.add_argument("--modes", default="eager,compile", help="comma list from ['eager', 'compile']")
    ap.add_argument("--data", default="data/stdlib", help="token store (tools/prepare_data.py)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    return ap.parse_args(argv)


def run(config: str, data: str, out: Path, steps: int, mode: str, compiled: bool, extra: list[str]) -> dict:
    import torch

    from pretrain.config import load_config
    from pretrain.train import Trainer

    torch._dynamo.reset()  # each run compiles afresh (one process runs every variant; dynamo's cache is per process)
    overrides = [f"data.paths=[{data}]", f"train.activation_checkpointing={mode}",
                 f"train.compile={str(compiled).lower()}", *quiet_run(steps, out), *extra]
    Trainer(load_config(config, overrides)).fit()
    records, tok_s = run_records(out)
    # every step has the same tokens, so step times are proportional to 1 / tokens_per_s
    warmup = sum(tok_s / records[s]["perf/tokens_per_s"] for s in range(1, WARMUP_STEPS + 1))
    losses = {s: r["train/loss"] for s, r in records.items() if "train/loss" in r}
    return {"tok_s": tok_s, "warmup_steps": warmup, "losses": losses}


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = args.checkpointing.split(",")
    compiled_modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES] + [m for m in compiled_modes if m not in ("eager", "compile")]
    missing = [c for c in args.configs.split(",") if not Path(c).is_file()]
    if bad or missing or args.steps <= WARMUP_STEPS:
        print(f"error: --checkpointing/--modes {bad} (allowed: {list(MODES)}; eager, compile), "
              f"--configs missing {missing}, --steps must exceed {WARMUP_STEPS}", file=sys.stderr)
        return 2
    if not Path(args.data).exists():
        print(f"error: --data {args.data} not found; prepare it: python tools/prepare_data.py --out {args.data}",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        for config in args.configs.split(","):
            base = None
            for compiled in [m == "compile" for m in compiled_modes]:
                for mode in modes:
                    label = f"{Path(config).stem} {'compile' if compiled else 'eager'} {mode}"
                    r = run(config, args.data, Path(tmp) / label.replace(" ", "-"), args.steps, mode, compiled,
                            args.overrides)
                    base = base or r
                    diff = max(abs(r["losses"][s] - base["losses"][s]) / abs(base["losses"][s])
                               for s in base["losses"])
                    rows.append((label, r, base, diff))
                    print(f"{label}: {r['tok_s']:,.0f} tokens/s", file=sys.stderr)
    print(f"\n{args.steps} steps each; tokens/s is the median after {WARMUP_STEPS} warm-up steps; ratios to the "
          "recipe's eager run without checkpointing\n")
    print(f"| recipe, mode, checkpointing | tokens/s | x eager none | first {WARMUP_STEPS} steps, in steady steps | "
          "max rel. loss diff |")
    print("|---|---|---|---|---|")
    for label, r, base, diff in rows:
        print(f"| {label} | {r['tok_s']:,.0f} | {ratio(r['tok_s'], base['tok_s'])} | "
              f"{r['warmup_steps']:,.1f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
