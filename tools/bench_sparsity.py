"""Sparse pretraining schedules against dense and static sparsity, from one run each, one table per suite.

Usage:
    python tools/bench_sparsity.py                       # configs/sparse/gmp.yaml, 300 steps, both suites
    python tools/bench_sparsity.py --suite gmp --steps 1000 --target 0.5 --set data.paths=[data/stdlib]

Suite ``gmp`` runs, on the same data and initialisation:
- ``dense``: no pruning;
- ``static``: pruned to ``--target`` by magnitude after the first step and fixed (static sparsity at the same
  final parameters);
- ``gmp-early``: the cubic schedule over 0-10% of training (pruning at the start);
- ``gmp-25-75``: the cubic schedule over 25-75% (*The Journey Matters*, arXiv 2501.12486: near-optimal);
- ``gmp-late``: the cubic schedule over 85-95% (pruning at the end).
The claim checked is the paper's direction: gmp-25-75 ends below gmp-early, gmp-late and static.

Suite ``nm`` trains every projection 2:4 (against the same dense run):
- ``nm-ste``: the mask of the weights at every step, plain straight-through gradient (SR-STE's decay 0);
- ``nm-srste``: SR-STE (Zhou et al., 2021), decay 2e-4 once per step;
- ``nm-mdgf``: progressive gradient flow's mask decay (arXiv 2402.04744), pruned weights times a linear
  ``a(t)`` from 1 to 0 over the first 90%, the mask fixed for the last 10%;
- ``nm-sdgf``: its structure decay, 3:4 over the first 90%, then the fixed 2:4 mask.
The claim checked: SR-STE, MDGF and SDGF each end below plain STE.

Suite ``guided`` trains every projection low-rank (rank 16; *Building on Efficient Foundations*, reference code
CLAIRE-Labo/StructuredFFN):
- ``lowrank``: plain;
- ``lowrank-guided``: self-guided, a dense guide weighted 1 to 0 (cosine) over the first half, then freed;
- ``lowrank-guided-stochastic``: the same with the reduced-FLOP mode (the guide runs with probability ``a``).
The claim checked: self-guided low-rank ends below plain low-rank at equal steps.

Each row: final density, final and average parameters (``sparsity/avg_params``), training FLOPs spent, and
the final validation loss against dense and against the suite's baseline (static, or nm-ste). ``--plot``
(default ``runs/bench-sparsity.png``) draws, per suite, the training loss of every run against the FLOPs it
has spent and its final validation loss against its average parameter count.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from pretrain.config import UserError, load_config
from pretrain.train import Trainer
from tools.bench_common import quiet_run, run_records

GMP = {"static": (0.0, None), "gmp-early": (0.0, 0.1), "gmp-25-75": (0.25, 0.75), "gmp-late": (0.85, 0.95)}
"""name: (start, end) fractions of training; static ends one step after it starts."""
NM = {"nm-ste": (0.0, "{method: nm, start: 0.0, end: 1.0}"),
      "nm-srste": (2e-4, "{method: nm, start: 0.0, end: 1.0}"),
      "nm-mdgf": (0.0, "{method: nm, start: 0.0, end: 0.9, mask_decay: linear}"),
      "nm-sdgf": (0.0, "{method: nm, start: 0.0, end: 0.9, structure_decay: true}")}
"""name: (SR-STE decay of the 2:4 layers, the nm rule)."""
GUIDED = {"lowrank": "", "lowrank-guided": "{method: self_guided, start: 0.0, end: 0.5}",
          "lowrank-guided-stochastic": "{method: self_guided, start: 0.0, end: 0.5, stochastic: true}"}
"""name: the self_guided rule (empty: none)."""
SUITES = {"gmp": ("static", "gmp-25-75", list(GMP)), "nm": ("nm-ste", None, list(NM)),
          "guided": ("lowrank", None, list(GUIDED))}
"""suite: (baseline, the run the claim is about (None: every other run), runs)."""


def overrides(name: str, args) -> list[str]:
    """The config overrides of run ``name`` (its structure and sparsity rules)."""
    if name == "dense":
        return ["sparsity.rules=[]"]
    if name in NM:
        decay, rule = NM[name]
        spec = f"{{kind: nm, n: 2, m: 4, decay: {decay}}}"
        return [f"model.structure={{attn: {spec}, mlp: {spec}}}", f"sparsity.rules=[{rule}]"]
    if name in GUIDED:
        spec = "{kind: lowrank, rank: 16}"
        return [f"model.structure={{attn: {spec}, mlp: {spec}}}", f"sparsity.rules=[{GUIDED[name]}]"]
    start, end = GMP[name]
    end = end if end is not None else 1.0 / args.steps  # one step: t0 = 0, t1 = 1
    return [f"sparsity.rules=[{{select: default, method: gmp, target: {args.target}, start: {start}, end: {end}, "
            f"interval: {args.interval}}}]"]


def run_one(config: str, name: str, args, out_dir: Path) -> dict:
    over = [*quiet_run(args.steps, out_dir), "model.structure={attn: {kind: dense}, mlp: {kind: dense}}",
            *args.extra, *overrides(name, args)]
    trainer = Trainer(load_config(config, over))
    result = trainer.fit()
    rec, _ = run_records(out_dir)
    last = rec[args.steps]
    per_step = 3.0 * trainer.flops["forward"] * trainer.cfg.train.global_batch * trainer.cfg.data.seq_len
    curve = [(rec[s].get("sparsity/flops_spent", per_step * s), rec[s]["train/loss"]) for s in sorted(rec)
             if s > 0 and "train/loss" in rec[s]]
    row = {"val": result["val/loss"], "params": trainer.full_params, "avg_params": trainer.full_params,
           "density": 1.0, "flops": per_step * args.steps, "curve": curve}
    if "sparsity/params" in last:
        row.update(params=last["sparsity/params"], avg_params=last["sparsity/avg_params"],
                   density=last.get("sparsity/density", 1.0), flops=last["sparsity/flops_spent"])
    return row


def plot(suites: list[str], rows: dict[str, dict], path: Path) -> None:
    """One row of two panels per suite: training loss against FLOPs spent; final validation loss against
    average parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(suites), 2, figsize=(11, 4 * len(suites)), squeeze=False)
    for (left, right), suite in zip(axes, suites):
        for name in ("dense", *SUITES[suite][2]):
            r = rows[name]
            flops, loss = zip(*r["curve"])
            left.plot(flops, loss, label=name, linewidth=1)
            right.scatter([r["avg_params"]], [r["val"]])
            right.annotate(name, (r["avg_params"], r["val"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        left.set(title=f"{suite}: training loss", xlabel="training FLOPs spent", ylabel="loss", yscale="log")
        left.legend(fontsize=8)
        right.set(title=f"{suite}: final validation loss", xlabel="average parameters", ylabel="loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(suite: str, rows: dict[str, dict], args) -> None:
    """The suite's table and the verdict on its claim."""
    base_name, best_name, names = SUITES[suite]
    dense, base = rows["dense"], rows[base_name]
    what = {"gmp": f"every projection pruned to density {args.target}", "nm": "every projection 2:4",
            "guided": "every projection low-rank (rank 16)"}[suite]
    print(f"\n{suite}: {args.steps} steps of {args.config}, {what}; FLOPs and parameters are the model's "
          "(embedding included)\n")
    print(f"| method | final density | params | avg params | x dense | train FLOPs | x dense | final val loss | "
          f"vs dense | vs {base_name} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("dense", *names):
        r = rows[name]
        print(f"| {name} | {r['density']:.3f} | {r['params']:,.0f} | {r['avg_params']:,.0f} | "
              f"{r['avg_params'] / dense['avg_params']:.2f} | {r['flops']:.3e} | {r['flops'] / dense['flops']:.2f} | "
              f"{r['val']:.4f} | {r['val'] - dense['val']:+.4f} | {r['val'] - base['val']:+.4f} |")
    if suite == "gmp":
        best = rows[best_name]["val"]
        others = {n: rows[n]["val"] for n in names if n != best_name}
        verdict = "reproduced" if all(best < v for v in others.values()) else "not reproduced at this scale"
        print(f"\nclaim: gmp over 25-75% of training ends below pruning at the start, at the end and static "
              f"sparsity: {verdict} ({best:.4f} vs " + ", ".join(f"{n} {v:.4f}" for n, v in others.items()) + ")")
        return
    for name in names[1:]:
        verdict = "reproduced" if rows[name]["val"] < base["val"] else "not reproduced at this scale"
        claim = "plain STE for 2:4" if suite == "nm" else "plain low-rank at equal steps"
        print(f"claim: {name} ends below {claim}: {verdict} ({rows[name]['val']:.4f} vs {base['val']:.4f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sparse/gmp.yaml", help="recipe (its sparsity rules are replaced)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.25, help="final density of every projection, in (0, 1]")
    ap.add_argument("--interval", type=int, default=10, help="steps between mask updates")
    ap.add_argument("--suite", action="append", choices=sorted(SUITES),
                    help="gmp (schedules against static sparsity), nm (2:4 training methods) or guided "
                         "(self-guided low-rank); default all three")
    ap.add_argument("--plot", default="runs/bench-sparsity.png", help="PNG of the runs (none: no plot)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = ap.parse_args(argv)
    if not 0.0 < args.target <= 1.0 or args.steps < 20 or args.interval <= 0:
        print(f"error: need 0 < --target <= 1 (got {args.target}), --steps >= 20 (got {args.steps}) and "
              f"--interval > 0 (got {args.interval})", file=sys.stderr)
        return 2
    suites = args.suite or list(SUITES)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-sparsity-") as tmp:
        for name in ("dense", *(n for suite in suites for n in SUITES[suite][2])):
            print(f"-- {name}", file=sys.stderr)
            try:
                rows[name] = run_one(args.config, name, args, Path(tmp) / name)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    for suite in suites:
        report(suite, rows, args)
    if args.plot != "none":
        plot(suites, rows, Path(args.plot))
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
