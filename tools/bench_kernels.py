"""Time each structured product's forward+backward against dense ``torch.matmul`` at the same (in, out).

Usage:
    python tools/bench_kernels.py                          # GPT-2-small and 1B shapes, 1024 tokens
    python tools/bench_kernels.py --tokens 4096 --recipes gpt2-small --products lowrank,monarch

The shapes are the projections of the recipes (``d -> d``, ``d -> d_ff``, ``d_ff -> d`` of
configs/gpt2-small-*.yaml and configs/llama-1b-blast.yaml); each product takes its recipe's structure
setting (about a quarter of the dense parameters). The path is whatever dispatch chooses here: the torch
reference on CPU, the Triton kernels on CUDA (``STRUCTORCH_KERNELS`` forces either). For each row: the
FLOP ratio (structured / dense) beside the measured time ratio (median of ``--reps`` after a warm-up),
both from the same run.

A second table times block sparsity at densities 0.5 and 0.25 (``--block-sizes``, random masks): the
kept-blocks product (``kernels.blocksparse``, forced) and the dense masked product ``x @ (W * mask)^T``, both
against dense ``torch.matmul``; the last column is the product a blocksparse layer picks there
(``use_kept_blocks``).
"""

import argparse
import statistics
import sys
import time

import torch

from kernels.blocksparse import blocksparse_linear, use_kept_blocks
from kernels.dispatch import use_triton
from model.config import StructureSpec
from model.structured import build_linear

RECIPES = {  # name: (d_model, d_ff, {product: spec fields}) as in the recipes' structure settings
    "gpt2-small": (768, 2048, {"lowrank": {"rank": 128}, "blockdiag": {"blocks": 4},
                               "monarch": {"blocks": 4, "rank": 32}, "blast": {"blocks": 4, "rank": 128},
                               "nm": {"n": 2, "m": 4}}),
    "1b": (2048, 5632, {"lowrank": {"rank": 256}, "blockdiag": {"blocks": 4},
                        "monarch": {"blocks": 4, "rank": 64}, "blast": {"blocks": 4, "rank": 256},
                        "nm": {"n": 2, "m": 4}}),
}


def timed(fn, reps: int) -> float:
    fn()  # warm-up (and Triton autotuning on CUDA)
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(kind: str, fields: dict, in_f: int, out_f: int, tokens: int, reps: int, device, dtype) -> dict:
    layer = build_linear(StructureSpec(kind, **fields), in_f, out_f).to(device=device, dtype=dtype)
    layer.reset_parameters(0.02)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, out_f, device=device, dtype=dtype)

    def structured():
        layer(x).backward(gy)

    def dense():
        torch.matmul(x, w.t()).backward(gy)

    t_s, t_d = timed(structured, reps), timed(dense, reps)
    return {"flops": layer.flops(tokens) / (2 * tokens * in_f * out_f), "time": t_s / t_d, "ms": 1e3 * t_s,
            "dense_ms": 1e3 * t_d, "path": "triton" if use_triton(x) else "reference"}


def bench_blocksparse(in_f: int, out_f: int, bs: int, density: float, tokens: int, reps: int, device,
                      dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    grid = (out_f // bs, in_f // bs)
    keep = torch.randperm(grid[0] * grid[1], generator=gen)[:max(1, round(density * grid[0] * grid[1]))]
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool).index_fill_(0, keep, True).view(grid).to(device)
    full = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, out_f, device=device, dtype=dtype)
    t_kept = timed(lambda: blocksparse_linear(x, w, mask, bs).backward(gy), reps)
    t_masked = timed(lambda: torch.matmul(x, (w * full).t()).backward(gy), reps)
    t_dense = timed(lambda: torch.matmul(x, w.t()).backward(gy), reps)
    return {"kept": t_kept / t_dense, "masked": t_masked / t_dense, "dense_ms": 1e3 * t_dense,
            "picks": "kept blocks" if use_kept_blocks(x, mask, bs) else "masked dense"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list from {list(RECIPES)}")
    ap.add_argument("--products", default="lowrank,blockdiag,monarch,blast,nm")
    ap.add_argument("--tokens", type=int, default=1024, help="rows of the activation (batch x sequence)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-sizes", default="32,64,128", help="blocksparse table: comma list (empty: skip)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    products = [p.strip() for p in args.products.split(",") if p.strip()]
    bad = [r for r in recipes if r not in RECIPES] + [p for p in products if p not in RECIPES["1b"][2]]
    try:
        block_sizes = [int(b) for b in args.block_sizes.split(",") if b.strip()]
    except ValueError:
        block_sizes = [0]
    if any(b <= 0 for b in block_sizes):
        print(f"--block-sizes={args.block_sizes!r}: a comma list of positive integers", file=sys.stderr)
        return 2
    if bad:
        print(f"unknown {bad}; recipes: {list(RECIPES)}, products: {list(RECIPES['1b'][2])}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    print(f"\nforward+backward, {args.tokens} tokens, {dtype} on {device}; ratios to dense torch.matmul at the "
          f"same (in, out) in this run\n")
    print("| recipe | product | in -> out | path | FLOP ratio | time ratio | ms | dense ms |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in recipes:
        d, d_ff, specs = RECIPES[recipe]
        for kind in products:
            for in_f, out_f in ((d, d), (d, d_ff), (d_ff, d)):
                r = bench(kind, specs[kind], in_f, out_f, args.tokens, args.reps, device, dtype)
                print(f"| {recipe} | {kind} {specs[kind]} | {in_f} -> {out_f} | {r['path']} | {r['flops']:.3f} "
                      f"| {r['time']:.3f} | {r['ms']:.1f} | {r['dense_ms']:.1f} |", flush=True)
    if block_sizes:
        print("\nblock sparsity, forward+backward; time ratios to dense torch.matmul in this run\n")
        print("| recipe | in -> out | block | density | kept-blocks | masked dense | dense ms | layer picks |")
        print("|---|---|---|---|---|---|---|---|")
    for recipe in recipes if block_sizes else []:
        d, d_ff, _ = RECIPES[recipe]
        for in_f, out_f in ((d, d), (d, d_ff), (d_ff, d)):
            for bs in block_sizes:
                if in_f % bs or out_f % bs:
                    continue
                for density in (0.5, 0.25):
                    r = bench_blocksparse(in_f, out_f, bs, density, args.tokens, args.reps, device, dtype)
                    print(f"| {recipe} | {in_f} -> {out_f} | {bs} | {density} | {r['kept']:.3f} | "
                          f"{r['masked']:.3f} | {r['dense_ms']:.1f} | {r['picks']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
