"""Our exact parameter and FLOP counts against DeepSpeed's FLOPs profiler: per structure, and for a whole GPT.

Usage:
    python tools/flops_check.py                                          # every structure, the tiny-cpu GPT
    python tools/flops_check.py --config configs/gpt2-small-blast.yaml --seq-len 1024
    python tools/flops_check.py --structures dense,blast --shape 768x3072 --tokens 64 --no-model

The profiler (``deepspeed.profiling.flops_profiler``) counts the torch products a forward calls. Where a
structure executes dense-shaped products (dense, low-rank, block-diagonal, Monarch, BLAST) it must see our count;
where a sparse kind runs a dense masked product (N:M, block sparsity below the kept-blocks threshold, sparse +
low-rank's scattered sparse part) it sees the executed count, which ``executed_flops`` reports beside the
structured one. Each row says which difference is expected and checks it; the exit code is 1 if a row does not
hold (a count of ours is wrong, or the profiler changed), 2 on bad arguments.

In the whole model, attention differs by design: we count causal attention (``4 d_attn (T+1)/2`` per token),
the profiler the full ``T x T`` square (``4 d_attn T``; RoPE's products too, where it sees them); norms, SiLU,
gating and residual adds are in the profiler's count and not in ours (as in Megatron's and PaLM's MFU).
"""

import argparse
import sys
from pathlib import Path

import torch

from model.structured import REGISTRY, build_linear, example_spec

BLOCKDIAG_SLACK = 2
"""FLOPs per product the profiler's einsum count (numpy's contraction-path estimate) may be below ours."""


def expected_profile(layer, tokens: int) -> tuple[int, int, str]:
    """What the profiler should count for one forward of ``layer`` over ``tokens`` tokens: (FLOPs, slack, why)."""
    kind = layer.name
    if kind in ("dense", "lowrank", "monarch"):
        return layer.flops(tokens), 0, "equal"
    if kind == "blockdiag":
        return layer.flops(tokens), BLOCKDIAG_SLACK, "equal up to the profiler's einsum estimate"
    if kind == "blast":
        coupling = 2 * tokens * layer.blocks * layer.blocks * layer.rank
        return (layer.flops(tokens) - coupling, 0,
                "the coupling's 2 b^2 r per token: elementwise products in one autograd Function it does not see")
    return (layer.executed_flops(tokens), 0,
            "a dense masked product executes: it sees the executed count, we credit the kept weights")


def _profile(module, *args):
    """Run ``module(*args)`` under DeepSpeed's profiler; the profiler object (read before ``end_profile``)."""
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    prof = FlopsProfiler(module)
    prof.start_profile()
    with torch.no_grad():
        module(*args)
    prof.stop_profile()
    return prof


def layer_rows(kinds: list[str], in_features: int, out_features: int, tokens: int) -> list[dict]:
    """One row per structure (its example spec) at ``in -> out`` over ``tokens`` tokens."""
    rows = []
    for kind in kinds:
        layer = build_linear(example_spec(kind), in_features, out_features)
        layer.reset_parameters(0.02, torch.Generator().manual_seed(0))
        prof = _profile(layer, torch.randn(1, tokens, in_features))
        flops, params = prof.get_total_flops(), prof.get_total_params()
        prof.end_profile()
        want, slack, why = expected_profile(layer, tokens)
        dense_shaped = kind in ("dense", "lowrank", "blockdiag", "monarch", "blast")
        ok = abs(flops - want) <= slack and (params == layer.num_params() if dense_shaped
                                              else params >= layer.num_params())
        rows.append({"kind": kind, "params": layer.num_params(), "params_profiler": params,
                     "flops": layer.flops(tokens), "executed": layer.executed_flops(tokens),
                     "profiler": flops, "ok": ok,
                     "why": why})
    return rows


def model_rows(cfg, seq_len: int) -> list[dict]:
    """Per-token rows for the GPT of model config ``cfg`` at ``seq_len``: each projection slot summed over the
    layers, the head, attention, the elementwise rest and the total."""
    from model.gpt import GPT

    gpt = GPT(cfg)
    gpt.init_weights(0)
    prof = _profile(gpt, torch.randint(0, cfg.vocab_size, (1, seq_len)))
    layers = gpt.structured_layers()
    slots: dict[str, dict] = {}
    for name, layer in layers.items():
        row = slots.setdefault(name.rsplit(".", 1)[-1], {"ours": 0, "want": 0, "slack": 0, "profiler": 0,
                                                          "why": set()})
        want, slack, why = expected_profile(layer, seq_len)
        row["ours"] += layer.flops(seq_len)
        row["want"] += want
        row["slack"] += slack
        row["profiler"] += layer.__flops__
        row["why"].add(why)
    rows = [{"part": f"{slot} ({len(layers) // len(slots)} layers)", "ours": r["ours"] / seq_len,
             "profiler": r["profiler"] / seq_len, "ok": abs(r["profiler"] - r["want"]) <= r["slack"],
             "why": "; ".join(sorted(r["why"]))} for slot, r in slots.items()]
    counts = gpt.flops_per_token(seq_len)
    if gpt.output is not None:
        head = gpt.output.__flops__ / seq_len
        rows.append({"part": "head", "ours": counts["head"], "profiler": head, "ok": head == counts["head"],
                     "why": "equal"})
    blocks = list(gpt.layers.values())
    attn = sum(b.attn.__flops__ for b in blocks) / seq_len  # the module's own products (its projections apart)
    full = sum(4 * b.attn.q.out_features * seq_len for b in blocks)  # SDPA as the profiler counts it
    rows.append({"part": "attention", "ours": counts["attention"], "profiler": attn, "ok": attn >= full,
                 "why": f"we count causal attention, it counts the full T x T square (4 d_attn T = {full:,} per token)"
                 + (" and RoPE's products" if attn > full else "")})
    total = prof.get_total_flops() / seq_len
    rest = total - sum(r["profiler"] for r in rows)
    rows.append({"part": "norms, SiLU, gating, residuals", "ours": 0, "profiler": rest, "ok": rest >= 0,
                 "why": "elementwise: not in our count"})
    rows.append({"part": "forward total", "ours": counts["forward"], "profiler": total, "ok": True,
                 "why": "the sum of the rows above"})
    prof.end_profile()
    return rows


def _print_layers(rows: list[dict], shape: str, tokens: int) -> None:
    print(f"\nper structure (example spec) at {shape}, {tokens} tokens\n")
    print("| structure | params | params (profiler) | FLOPs structured | FLOPs executed | FLOPs (profiler) "
          "| profiler / executed | check | why |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['params']:,} | {r['params_profiler']:,} | {r['flops']:,} | {r['executed']:,} | "
              f"{r['profiler']:,} | {r['profiler'] / r['executed']:.3f} | {'ok' if r['ok'] else 'FAIL'} | "
              f"{r['why']} |")


def _print_model(rows: list[dict], config: str, seq_len: int) -> None:
    print(f"\nthe GPT of {config} at seq_len {seq_len}: forward FLOPs per token\n")
    print("| part | ours | profiler | profiler / ours | check | why |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['profiler'] / r['ours']:.3f}" if r["ours"] else "-"
        print(f"| {r['part']} | {r['ours']:,.0f} | {r['profiler']:,.0f} | {ratio} | {'ok' if r['ok'] else 'FAIL'} "
              f"| {r['why']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structures", default=",".join(REGISTRY), help=f"comma list from {list(REGISTRY)}")
    ap.add_argument("--shape", default="64x96", help="IN x OUT of the per-structure table")
    ap.add_argument("--tokens", type=int, default=16, help="tokens of the per-structure table")
    ap.add_argument("--config", default="configs/tiny-cpu.yaml", help="the recipe of the whole-model table")
    ap.add_argument("--seq-len", type=int, default=None, help="the model table's sequence (default data.seq_len)")
    ap.add_argument("--vocab-size", type=int, default=None, help="model.vocab_size if the recipe leaves it unset")
    ap.add_argument("--no-model", action="store_true", help="only the per-structure table")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.structures.split(",") if k.strip()]
    errors = []
    if not kinds or any(k not in REGISTRY for k in kinds):
        errors.append(f"--structures {args.structures}: allowed values {list(REGISTRY)}")
    shape = args.shape.split("x")
    if len(shape) != 2 or not all(v.isdigit() and int(v) > 0 for v in shape):
        errors.append(f"--shape {args.shape}: IN x OUT, e.g. 64x96")
    if args.tokens <= 0 or (args.seq_len is not None and args.seq_len <= 0):
        errors.append("--tokens and --seq-len must be positive")
    if not args.no_model and not Path(args.config).is_file():
        errors.append(f"--config {args.config}: no such file")
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 2
    try:
        import deepspeed.profiling.flops_profiler  # noqa: F401
    except ImportError:
        print("error: deepspeed is not installed (pip install -e .)", file=sys.stderr)
        return 2
    rows = layer_rows(kinds, int(shape[0]), int(shape[1]), args.tokens)
    _print_layers(rows, args.shape, args.tokens)
    ok = all(r["ok"] for r in rows)
    if not args.no_model:
        from pretrain.config import UserError, load_config

        overrides = [f"model.vocab_size={args.vocab_size}"] if args.vocab_size else []
        try:
            cfg = load_config(args.config, overrides)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if cfg.model.vocab_size is None:
            cfg = load_config(args.config, [*overrides, "model.vocab_size=32000"])
        seq_len = args.seq_len or cfg.data.seq_len
        if seq_len > cfg.model.max_seq_len:
            print(f"error: --seq-len {seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}", file=sys.stderr)
            return 2
        rows = model_rows(cfg.model, seq_len)
        _print_model(rows, args.config, seq_len)
        ok = ok and all(r["ok"] for r in rows)
    print("\nall rows hold" if ok else "\nFAIL: a row does not hold (see the check column)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
