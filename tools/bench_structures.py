"""Train the same model with each structure at equal steps and compare against dense from the same run.

Usage:
    python tools/bench_structures.py                                  # tiny-cpu, 300 steps, 8 structures
    python tools/bench_structures.py --steps 100 --structures dense,lowrank,blast
    python tools/bench_structures.py --config configs/gpt2-small-dense.yaml --steps 2000 --data data/fineweb

Every attention and MLP projection takes the structure (at roughly a quarter of the dense projection
parameters for the tiny-cpu shapes). Prints a Markdown table: parameters, forward FLOPs per token, training
tokens/s (median step), final validation loss, each also as a ratio to dense.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from model.structured import REGISTRY, example_spec
from pretrain.config import UserError, load_config
from pretrain.train import Trainer
from tools.bench_common import quiet_run, ratio, run_records

SPECS = {kind: example_spec(kind).flow() for kind in REGISTRY}


def run_one(config: str, spec: str, steps: int, data: str | None, out_dir: Path, extra: list[str]) -> dict:
    overrides = [f"model.structure={{default: {spec}}}", *quiet_run(steps, out_dir), *extra]
    if data:
        overrides.append(f"data.paths=[{data}]")
    trainer = Trainer(load_config(config, overrides))
    result = trainer.fit()
    rec, tok_s = run_records(out_dir)
    gpt = trainer.model.stages[0]  # one process: the whole GPT
    steady = [r for s, r in rec.items() if s > 2 and "perf/mfu" in r]

    def median(key):
        values = sorted(r[key] for r in steady if key in r)
        return values[len(values) // 2] if values else None

    return {"params": gpt.num_params(exclude_embedding=True), "flops": trainer.flops["forward"],
            "tok_s": tok_s, "val0": rec[0]["val/loss"], "val": result["val/loss"], "mfu": median("perf/mfu"),
            "mfu_executed": median("perf/mfu_executed"),
            "memory": max((r.get("perf/max_memory_gib", 0.0) for r in rec.values()), default=0.0)}


def _cell(value: float | None, fmt: str) -> str:
    return "-" if not value else format(value, fmt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", help="token store (default: the config's data.paths)")
    ap.add_argument("--structures", default=",".join(SPECS), help=f"comma list from {list(SPECS)}")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.structures.split(",") if s.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        print(f"error: --structures {unknown} unknown; allowed: {list(SPECS)}", file=sys.stderr)
        return 2
    if "dense" not in names:
        names.insert(0, "dense")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-structures-") as tmp:
        for name in names:
            print(f"-- {name}: {SPECS[name]}", file=sys.stderr)
            try:
                rows[name] = run_one(args.config, SPECS[name], args.steps, args.data, Path(tmp) / name, args.extra)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    base = rows["dense"]
    print(f"\n{args.steps} steps of {args.config}; parameters exclude the embedding; ratios are to dense.\n")
    print("MFU is on the structure's FLOPs and on the FLOPs its products execute (zeros included: N:M, and block")
    print("sparsity where no kept-blocks product applies, run dense products); peak memory is CUDA's (- on CPU).\n")
    print("| structure | params | x dense | fwd FLOPs/token | x dense | tokens/s | x dense | MFU | MFU executed | "
          "peak GiB | x dense | val loss (init) | final val loss | diff vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {ratio(r['params'], base['params'])} | {r['flops']:,} | "
              f"{ratio(r['flops'], base['flops'])} | {r['tok_s']:,.0f} | {ratio(r['tok_s'], base['tok_s'])} | "
              f"{_cell(r['mfu'], '.3f')} | {_cell(r['mfu_executed'], '.3f')} | {_cell(r['memory'], '.2f')} | "
              f"{ratio(r['memory'], base['memory'])} | {r['val0']:.3f} | {r['val']:.3f} | "
              f"{r['val'] - base['val']:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
