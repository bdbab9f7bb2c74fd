"""Tokens/s and bytes communicated per step per mesh dim, for dense and each structure at equal width.

Usage:
    python tools/bench_parallel.py                                   # tp=4 on 4 CPU processes (gloo)
    python tools/bench_parallel.py --world 8 --dp 2 --tp 2 --pp 2 --steps 8
    python tools/bench_parallel.py --d-model 768 --layers 12 --world 8 --tp 8     # on a GPU node

Re-launches itself under torchrun with ``--world`` processes. Every structure trains the same shapes
(``--d-model``, ``--layers``; every attention and MLP projection structured at about a quarter of the dense
parameters) on the default corpus for ``--steps`` steps; the first two are warm-up for tokens/s. Bytes are
what one rank (rank 0) sends per step, counting ring algorithms (all-reduce 2(p-1)/p N, all-gather,
reduce-scatter and all-to-all (p-1)/p N): tp = its tensor-parallel collectives (forward and backward),
dp = the optimizer's gradient reduce to the block owners plus the broadcast of updated blocks (ZeRO-1),
pp = its activation and gradient sends. Ratios are to dense from the same run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from model.structured import REGISTRY, example_spec

SPECS = {kind: example_spec(kind).flow() for kind in REGISTRY}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--data", default="data/stdlib", help="token store (tools/prepare_data.py)")
    ap.add_argument("--structures", default=",".join(SPECS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # the shared scratch directory, set by the launcher
    return ap.parse_args(argv)


def worker(args) -> None:
    import torch.distributed as dist

    from pretrain.config import load_config
    from pretrain.train import Trainer
    from tools.bench_common import quiet_run, ratio, run_records

    rows = {}
    tmp = args.worker
    for name in args.structures.split(","):
        overrides = [
            f"data.paths=[{args.data}]", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
            f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
            "model.n_kv_heads=4", f"model.d_ff={3 * args.d_model}", f"model.structure={{default: {SPECS[name]}}}",
            f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}",
            "train.eval_batches=4", f"parallel.dp={args.dp}", f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
            *quiet_run(args.steps, Path(tmp) / name)]
        trainer = Trainer(load_config(None, overrides))
        stats = trainer.record_comm()  # dp: gradient reduce + updated-block broadcast
        trainer.fit()
        if dist.get_rank() == 0:  # bytes are the same every step; tokens/s is the median after 2 warm-up steps
            _, tok_s = run_records(Path(tmp) / name)
            rows[name] = {"tok_s": tok_s, **{d: stats.bytes[d] / args.steps for d in ("tp", "dp", "pp")},
                          "params": trainer.full_params}
    if dist.get_rank() == 0:
        base = rows.get("dense")
        print(f"\n(dp, tp, pp) = ({args.dp}, {args.tp}, {args.pp}), d_model {args.d_model}, {args.layers} layers, "
              f"seq {args.seq_len}, global batch {args.global_batch}; bytes per step on rank 0; ratios to dense\n")
        print("| structure | params | tokens/s | x dense | tp MB/step | x dense | dp MB/step | x dense | pp MB/step |")
        print("|---|---|---|---|---|---|---|---|---|")

        for name, r in rows.items():
            print(f"| {name} | {r['params']:,} | {r['tok_s']:,.0f} | {ratio(r['tok_s'], base['tok_s'])} | "
                  f"{r['tp'] / 1e6:.2f} | {ratio(r['tp'], base['tp'])} | {r['dp'] / 1e6:.2f} | "
                  f"{ratio(r['dp'], base['dp'])} | {r['pp'] / 1e6:.2f} |")
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [s for s in args.structures.split(",") if s not in SPECS]
    if unknown:
        print(f"error: --structures {unknown} unknown; allowed: {list(SPECS)}", file=sys.stderr)
        return 2
    if "dense" not in args.structures.split(","):
        args.structures = "dense," + args.structures
    if args.dp * args.tp * args.pp != args.world:
        print(f"error: --dp x --tp x --pp = {args.dp * args.tp * args.pp} must equal --world {args.world}",
              file=sys.stderr)
        return 2
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world}",
               __file__, "--worker", tmp, *(argv if argv is not None else sys.argv[1:])]
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
