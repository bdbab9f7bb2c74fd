"""Scaling-law sweeps: a sweep file -> points -> runs (local processes or a SLURM job array) -> CSV -> fits ->
plots and a report.

Usage:
    python tools/sweep.py plan    configs/sweeps/tiny.yaml            # the points, their parameters, tokens, FLOPs
    python tools/sweep.py run     configs/sweeps/tiny.yaml [--dry-run] [--executor slurm]
    python tools/sweep.py status  configs/sweeps/tiny.yaml
    python tools/sweep.py collect configs/sweeps/tiny.yaml            # -> <out_dir>/results.csv
    python tools/sweep.py fit     configs/sweeps/tiny.yaml [--out fit.json]
    python tools/sweep.py fit     --points published.csv --out fit.json   # any CSV with params,tokens,loss
    python tools/sweep.py report  configs/sweeps/tiny.yaml            # -> <out_dir>/report/, TB hparams

A sweep file::

    base: ../tiny-cpu.yaml           # recipe, relative to the sweep file
    out_dir: runs/sweeps/tiny        # relative to the working directory
    axes:                            # each a list of values or a mapping label -> value
      size: {s: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 192}, m: {...}}   # model fields
      structure: {dense: {default: {kind: dense}}, lowrank: {...}}          # model.structure (whole)
      sparsity: {none: [], gmp: [{method: gmp, target: 0.5}]}                # sparsity.rules
      steps: [100]                   # or tokens: [...]; not with budgets
      lr: [0.003]
    budgets: [1.0e+12, 3.0e+12]      # isoFLOP mode: each budget's steps = C / (train FLOPs per step)
    exclude: [{structure: lowrank, sparsity: gmp}]
    overrides: ["train.eval_interval=50"]
    executor: {workers: 2, threads: 1}
    slurm: {partition: gpu, time: "04:00:00", gpus: 1, max_concurrent: 8}

``run`` is idempotent: finished points (``done.json``) are skipped and unfinished ones resume from their
newest checkpoint (``--resume auto``), so an interrupted runner, a preempted array task or a requeue simply
continues. Parameters and FLOPs are the model's exact structured counts (``num_params``, ``flops_per_token``).
"""

import argparse
import csv
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pretrain.config import UserError, load_config
from pretrain.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

AXES = ("size", "structure", "sparsity", "steps", "tokens", "lr")
KEYS = ("base", "out_dir", "axes", "budgets", "exclude", "overrides", "executor", "slurm")
SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


class SweepError(UserError):
    """A sweep file or command that cannot work; the message names the field."""


@dataclass
class Point:
    id: str
    labels: dict[str, str]
    overrides: list[str]
    steps: int
    params: int
    params_nonemb: int
    train_flops_per_token: int
    tokens: int
    flops: float
    budget: float | None = None
    dir: str = ""


@dataclass
class Sweep:
    path: Path
    base: Path
    out: Path
    axes: dict[str, dict[str, object]]
    budgets: list[float]
    exclude: list[dict[str, str]]
    overrides: list[str]
    workers: int = 1
    threads: int = 1
    slurm: dict = field(default_factory=dict)


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path}: not YAML ({e})") from None
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {unknown}; allowed: {list(KEYS)}")
    if "base" not in raw:
        raise SweepError(f"{path}: base (the recipe the points start from) is required")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base={raw['base']}: no recipe at {base}")
    axes_raw = raw.get("axes") or {}
    bad = sorted(set(axes_raw) - set(AXES))
    if bad:
        raise SweepError(f"{path}: unknown axis {bad}; allowed: {list(AXES)}")
    axes = {}
    for name, values in axes_raw.items():
        if isinstance(values, dict):
            axes[name] = {str(k): v for k, v in values.items()}
        elif isinstance(values, list):
            axes[name] = {_label(v): v for v in values}
        else:
            raise SweepError(f"{path}: axes.{name} must be a list or a mapping label -> value")
        if not axes[name]:
            raise SweepError(f"{path}: axes.{name} is empty: the grid would have no point")
    for label, size in axes.get("size", {}).items():
        if not isinstance(size, dict) or set(size) - set(SIZE_FIELDS):
            raise SweepError(f"{path}: axes.size.{label} must map fields of {list(SIZE_FIELDS)} to values")
    budgets = [float(b) for b in raw.get("budgets") or []]
    if budgets and ("steps" in axes or "tokens" in axes):
        raise SweepError(f"{path}: budgets fix each point's steps; drop axes.steps / axes.tokens")
    if "steps" in axes and "tokens" in axes:
        raise SweepError(f"{path}: axes.steps and axes.tokens both set; choose one")
    if any(b <= 0 for b in budgets):
        raise SweepError(f"{path}: budgets={budgets} must be positive FLOPs")
    ex = raw.get("executor") or {}
    sweep = Sweep(path, base, Path(raw.get("out_dir") or f"runs/sweeps/{path.stem}"), axes, budgets,
                  list(raw.get("exclude") or []), [str(o) for o in raw.get("overrides") or []],
                  int(ex.get("workers", 1)), int(ex.get("threads", 1)), dict(raw.get("slurm") or {}))
    if sweep.workers < 1 or sweep.threads < 1:
        raise SweepError(f"{path}: executor.workers and executor.threads must be >= 1")
    for i, rule in enumerate(sweep.exclude):
        if not isinstance(rule, dict) or set(rule) - set(axes):
            raise SweepError(f"{path}: exclude[{i}]={rule} must map axes of this sweep to labels")
    return sweep


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _overrides(axis: str, value) -> list[str]:
    if axis == "size":
        return [f"model.{k}={v}" for k, v in value.items()]
    if axis == "structure":
        return [f"model.structure={_flow(value)}"]
    if axis == "sparsity":
        return [f"sparsity.rules={_flow(value or [])}"]
    if axis == "lr":
        return [f"optim.lr={value}"]
    return []


def _measure(sweep: Sweep, overrides: list[str], where: str):
    """The point's config, exact parameters and training FLOPs per token (model on ``meta``)."""
    import torch

    from model.gpt import GPT
    from pretrain.data import TokenStore

    try:
        cfg = load_config(sweep.base, overrides)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = TokenStore(cfg.data.paths[0]).vocab_size
        with torch.device("meta"):
            model = GPT(cfg.model)
    except (UserError, ValueError) as e:
        raise SweepError(f"{where}: {e}") from None
    params = model.num_params()
    return cfg, params, model.num_params(exclude_embedding=True), model.flops_per_token(cfg.data.seq_len)["train"]


def plan(sweep: Sweep) -> list[Point]:
    names = [a for a in AXES if a in sweep.axes and a not in ("steps", "tokens")]
    length = [a for a in ("steps", "tokens") if a in sweep.axes]
    if not length and not sweep.budgets:
        raise SweepError(f"{sweep.path}: give axes.steps, axes.tokens or budgets (how long each point trains)")
    combos = list(itertools.product(*[list(sweep.axes[a].items()) for a in names + length]))
    points = []
    for combo in combos:
        labels = {a: lab for a, (lab, _) in zip(names + length, combo)}
        if any(all(labels.get(k) == str(v) for k, v in rule.items()) for rule in sweep.exclude):
            continue
        over = [o for a, (_, v) in zip(names + length, combo) for o in _overrides(a, v)] + sweep.overrides
        where = f"{sweep.path}: point {labels}"
        cfg, params, nonemb, fpt = _measure(sweep, over, where)
        per_step = cfg.train.global_batch * cfg.data.seq_len
        runs = []
        if sweep.budgets:
            for c in sweep.budgets:
                steps = round(c / (fpt * per_step))
                if steps < 1:
                    raise SweepError(f"{sweep.path}: budgets: {c:.3g} FLOPs is below one step of point {labels} "
                                     f"({fpt * per_step:.3g} FLOPs)")
                runs.append(({"budget": f"{c:.3g}"}, steps, c))
        elif "steps" in labels:
            runs.append(({}, int(sweep.axes["steps"][labels["steps"]]), None))
        else:
            runs.append(({}, math.ceil(float(sweep.axes["tokens"][labels["tokens"]]) / per_step), None))
        for extra, steps, budget in runs:
            all_labels = {**labels, **extra}
            pid = "-".join(f"{v}" for v in all_labels.values()).replace("/", "_").replace(" ", "")
            point_dir = sweep.out / "points" / pid
            over_all = [*over, f"train.steps={steps}", f"train.out_dir={point_dir}"]
            points.append(Point(pid, all_labels, over_all, steps, params, nonemb, fpt, steps * per_step,
                                float(fpt) * steps * per_step, budget, str(point_dir)))
    if not points:
        raise SweepError(f"{sweep.path}: the grid is empty (every combination excluded)")
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise SweepError(f"{sweep.path}: two points share an id; give the axes distinct labels")
    return points


# -- running --------------------------------------------------------------------------------------------------
def command(sweep: Sweep, p: Point) -> list[str]:
    sets = [x for o in p.overrides for x in ("--set", o)]
    return [sys.executable, "-m", "pretrain.train", "--config", str(sweep.base), *sets, "--resume", "auto"]


def state(p: Point) -> dict:
    d = Path(p.dir)
    for name in ("done", "failed"):
        f = d / f"{name}.json"
        if f.is_file():
            return {"state": name, **json.loads(f.read_text())}
    if (d / "metrics.jsonl").is_file():
        return {"state": "partial"}
    return {"state": "pending"}


def _error_line(log: str) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_point(sweep: Sweep, p: Point, threads: int) -> dict:
    d = Path(p.dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "failed.json").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    start = time.time()
    with open(d / "train.log", "ab") as log:
        rc = subprocess.run(command(sweep, p), env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    spent = json.loads((d / "wall.json").read_text())["seconds"] if (d / "wall.json").is_file() else 0.0
    (d / "wall.json").write_text(json.dumps({"seconds": spent + wall}))
    if rc == 0:
        result = {"wall_seconds": spent + wall}
        (d / "done.json").write_text(json.dumps(result))
        return {"state": "done", **result}
    tail = (d / "train.log").read_text(errors="replace")[-20000:]
    result = {"returncode": rc, "error": _error_line(tail)}
    (d / "failed.json").write_text(json.dumps(result))
    return {"state": "failed", **result}


def slurm_script(sweep: Sweep, points: list[Point]) -> str:
    """An array job over ``points`` (one task each) running launch/slurm.sbatch with RUN_DIR = the point."""
    s = sweep.slurm
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={s.get('job_name', 'sweep-' + sweep.path.stem)}",
             f"#SBATCH --array=0-{len(points) - 1}%{int(s.get('max_concurrent', 8))}", "#SBATCH --nodes=1",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={s.get('time', '04:00:00')}", "#SBATCH --requeue",
             "#SBATCH --signal=B:USR1@300", f"#SBATCH --output={sweep.out}/logs/%A_%a.out"]
    if s.get("partition"):
        lines.append(f"#SBATCH --partition={s['partition']}")
    if s.get("gpus"):
        lines.append(f"#SBATCH --gpus-per-node={int(s['gpus'])}")
    lines += ["# One sweep point per array task; launch/slurm.sbatch passes --resume auto, so a requeued or",
              "# re-submitted task continues from the point's newest checkpoint.", "set -euo pipefail",
              f"cd {shlex.quote(str(Path.cwd()))}", "case \"$SLURM_ARRAY_TASK_ID\" in"]
    for i, p in enumerate(points):
        sets = " ".join(f"--set {shlex.quote(o)}" for o in p.overrides)
        lines.append(f"  {i}) RUN_DIR={shlex.quote(p.dir)} GPUS_PER_NODE={int(s.get('gpus', 1))} exec bash "
                     f"launch/slurm.sbatch --config {shlex.quote(str(sweep.base))} {sets} ;;")
    lines += ["  *) echo \"no sweep point for array task $SLURM_ARRAY_TASK_ID\" >&2; exit 2 ;;", "esac", ""]
    return "\n".join(lines)


def run(sweep: Sweep, points: list[Point], executor: str, dry_run: bool) -> int:
    todo = [p for p in points if state(p)["state"] != "done"]
    print(f"{len(points) - len(todo)} of {len(points)} points done; {len(todo)} to run", file=sys.stderr)
    if executor == "slurm":
        script = slurm_script(sweep, todo) if todo else ""
        if dry_run or not todo:
            print(script)
            return 0
        if shutil.which("sbatch") is None:
            raise SweepError("--executor slurm: sbatch is not on PATH here; use --dry-run to print the array script")
        path = sweep.out / "sweep.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        return subprocess.run(["sbatch", str(path)]).returncode
    if dry_run:
        for p in todo:
            print(f"OMP_NUM_THREADS={sweep.threads} " + shlex.join(command(sweep, p)))
        return 0
    from tqdm import tqdm

    failed = 0
    with ThreadPoolExecutor(sweep.workers) as pool, tqdm(total=len(todo), desc="sweep", unit="point") as bar:
        for p, result in zip(todo, pool.map(lambda q: run_point(sweep, q, sweep.threads), todo)):
            bar.update(1)
            if result["state"] == "failed":
                failed += 1
                tqdm.write(f"{p.id}: failed ({result['error']})")
    return 1 if failed else 0


def status_table(points: list[Point]) -> str:
    rows = ["| point | state | step | last loss | val loss | note |", "|---|---|---|---|---|---|"]
    for p in points:
        st = state(p)
        rec = read_metrics(Path(p.dir) / "metrics.jsonl") if (Path(p.dir) / "metrics.jsonl").is_file() else {}
        steps = [s for s, r in rec.items() if "train/loss" in r]
        last = rec[max(steps)]["train/loss"] if steps else None
        vals = [r["val/loss"] for s, r in sorted(rec.items()) if "val/loss" in r]
        note = st.get("error", "") if st["state"] == "failed" else ""
        rows.append(f"| {p.id} | {st['state']} | {max(steps) if steps else 0}/{p.steps} | "
                    f"{'' if last is None else f'{last:.4f}'} | {f'{vals[-1]:.4f}' if vals else ''} | {note} |")
    return "\n".join(rows)


# -- results ----------------------------------------------------------------------------------------------------
COLUMNS = ["id", "structure", "size", "sparsity", "budget", "params", "params_nonemb", "avg_params", "tokens", "flops",
           "loss", "best_loss", "wall_seconds"]


def collect(points: list[Point], path: Path) -> list[dict]:
    rows = []
    for p in points:
        st = state(p)
        if st["state"] != "done":
            continue
        rec = read_metrics(Path(p.dir) / "metrics.jsonl")
        vals = [r["val/loss"] for s, r in sorted(rec.items()) if "val/loss" in r]
        last = rec[max(rec)]
        rows.append({"id": p.id, "structure": p.labels.get("structure", ""), "size": p.labels.get("size", ""),
                     "sparsity": p.labels.get("sparsity", ""), "budget": p.budget or "", "params": p.params,
                     "params_nonemb": p.params_nonemb,
                     "avg_params": last.get("sparsity/avg_params", p.params),
                     "tokens": p.tokens, "flops": last.get("sparsity/flops_spent", p.flops),
                     "loss": vals[-1] if vals else "", "best_loss": min(vals) if vals else "",
                     "wall_seconds": round(st.get("wall_seconds", 0.0), 1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def read_points(path: Path) -> list[dict]:
    if not path.is_file():
        raise SweepError(f"--points {path}: no such file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"params", "tokens", "loss"} - set(rows[0] if rows else {})
    if missing:
        raise SweepError(f"--points {path}: missing column(s) {sorted(missing)}; need params,tokens,loss "
                         "(optional avg_params, flops, budget)")
    out = []
    for i, r in enumerate(rows):
        try:
            row = {k: float(r[k]) for k in ("params", "tokens", "loss")}
            for k in ("avg_params", "flops", "budget"):
                if r.get(k) not in (None, ""):
                    row[k] = float(r[k])
        except ValueError as e:
            raise SweepError(f"--points {path}: row {i + 2}: {e}") from None
        row["structure"] = r.get("structure", "")
        row["sparsity"] = r.get("sparsity", "")
        out.append(row)
    return out


def fit(rows: list[dict], bootstrap: int) -> dict:
    """Approach 3 on total parameters (all points, and per structure), the same law on average parameters (when
    any run is sparse), approach 2 when points carry budgets; with the compute-optimal allocation."""
    from tools.scaling import FitError, fit_isoflop, fit_law

    rows = [r for r in rows if r.get("loss") not in ("", None)]
    n, d, loss = ([float(r[k]) for r in rows] for k in ("params", "tokens", "loss"))
    out: dict = {"points": len(rows)}
    try:
        law = fit_law(n, d, loss, bootstrap=bootstrap)
        out["approach3"] = law.as_dict()
        out["compute_optimal"] = {f"{c:.0e}": dict(zip(("params", "tokens"), law.optimal(c))) for c in
                                  (1e18, 1e20, 1e22)}
    except FitError as e:
        out["approach3_error"] = str(e)
    by_structure = {}
    for name in sorted({r.get("structure", "") for r in rows} - {""}):
        sel = [r for r in rows if r.get("structure") == name]
        try:
            by_structure[name] = fit_law(*([float(r[k]) for r in sel] for k in ("params", "tokens", "loss")),
                                         bootstrap=bootstrap).as_dict()
        except FitError as e:
            by_structure[name] = {"error": str(e)}
    if len(by_structure) > 1:
        out["by_structure"] = by_structure
    avg = [float(r.get("avg_params") or r["params"]) for r in rows]
    if any(abs(a - p) > 0.5 for a, p in zip(avg, n)):
        try:
            out["average_params"] = fit_law(avg, d, loss, bootstrap=bootstrap).as_dict()
        except FitError as e:
            out["average_params_error"] = str(e)
    budgeted = [r for r in rows if r.get("budget") not in ("", None)]
    for group in sorted({_group(r) for r in budgeted}):  # one isoFLOP analysis per structure and schedule
        sel = [r for r in budgeted if _group(r) == group]
        try:
            iso = fit_isoflop([float(r.get("flops") or 6 * float(r["params"]) * float(r["tokens"])) for r in sel],
                              [float(r["params"]) for r in sel], [float(r["tokens"]) for r in sel],
                              [float(r["loss"]) for r in sel], [float(r["budget"]) for r in sel])
            out.setdefault("approach2", {})[group] = asdict(iso)
        except FitError as e:
            out.setdefault("approach2", {})[group] = {"error": str(e)}
    return out


def describe_fit(res: dict) -> str:
    from tools.scaling import Law

    lines = [f"{res['points']} points"]
    for key, title in (("approach3", "approach 3, L(N, D) = E + A/N^alpha + B/D^beta"),
                       ("average_params", "the same law on average parameters (The Journey Matters)")):
        if key in res:
            lines.append(f"{title}: {Law(**res[key]).describe()}")
        elif f"{key}_error" in res:
            lines.append(f"{title}: not fitted ({res[key + '_error']})")
    for name, law in res.get("by_structure", {}).items():
        lines.append(f"  {name}: " + (Law(**law).describe() if "error" not in law else f"not fitted ({law['error']})"))
    for c, alloc in res.get("compute_optimal", {}).items():
        lines.append(f"compute-optimal at C={c} (C = 6ND): N={alloc['params']:.3g}, D={alloc['tokens']:.3g}")
    for group, a in res.get("approach2", {}).items():
        if "error" in a:
            lines.append(f"approach 2, {group}: not fitted ({a['error']})")
            continue
        at_edge = sum(n <= min(a["n_opt"]) * 1.0001 for n in a["n_opt"])
        lines.append(f"approach 2, {group}: N_opt = {a['n_coefficient']:.3g} C^{a['n_exponent']:.3f}, D_opt = "
                     f"{a['d_coefficient']:.3g} C^{a['d_exponent']:.3f} over {len(a['budgets'])} budgets"
                     + (f" ({at_edge} minima at the sweep's smallest size: the optimum lies below it)"
                        if at_edge > 1 else ""))
    return "\n".join(lines)


def _group(row: dict) -> str:
    return f"{row.get('structure') or 'all'}" + (f"+{row['sparsity']}" if row.get("sparsity") not in ("", None, "none")
                                                 else "")


def _frontier(law, rows: list[dict], flops) -> list[float]:
    """The lowest loss the law predicts at each compute budget over model sizes within the points' range, with
    the points' exact training FLOPs per token (a power law in N fitted through them) setting D = C / f(N)."""
    import numpy as np

    n = np.array([float(r["params"]) for r in rows])
    fpt = np.array([float(r["flops"]) / float(r["tokens"]) for r in rows])
    slope, icpt = np.polyfit(np.log(n), np.log(fpt), 1) if len(set(n.tolist())) > 1 else (0.0, np.log(fpt.mean()))
    sizes = np.logspace(np.log10(n.min()), np.log10(n.max()), 200)
    per_token = np.exp(icpt + slope * np.log(sizes))
    return [float(np.min(law(sizes, c / per_token))) for c in flops]


def report(sweep: Sweep, points: list[Point], bootstrap: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tools.scaling import Law

    out = sweep.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in collect(points, sweep.out / "results.csv") if r["loss"] != ""]
    if not rows:
        raise SweepError(f"{sweep.path}: no finished point to report; run the sweep first")
    res = fit(rows, bootstrap)
    law = Law(**res["approach3"]) if "approach3" in res else None
    figs = []
    fig, ax = plt.subplots(figsize=(7, 5))
    cs = np.logspace(math.log10(min(r["flops"] for r in rows)), math.log10(max(r["flops"] for r in rows)), 50)
    for s in sorted({r["structure"] for r in rows}):
        sel = [r for r in rows if r["structure"] == s]
        dots = ax.scatter([r["flops"] for r in sel], [r["loss"] for r in sel], label=s or "points")
        own = res.get("by_structure", {}).get(s) or res.get("approach3")
        if own and "error" not in own:
            ax.plot(cs, _frontier(Law(**own), sel, cs), "--", color=dots.get_facecolor()[0], label=f"{s} frontier")
    ax.set(xscale="log", xlabel="training FLOPs (exact)", ylabel="final validation loss", title="loss against compute")
    ax.legend(fontsize=8)
    figs.append(("loss_vs_compute.png", fig))
    if any(r["budget"] != "" for r in rows):
        fig, ax = plt.subplots(figsize=(7, 5))
        budgets = sorted({float(r["budget"]) for r in rows if r["budget"] != ""})
        groups = sorted({_group(r) for r in rows if r["budget"] != ""})
        styles = ["-", "--", ":", "-."]
        for gi, g in enumerate(groups):
            for bi, b in enumerate(budgets):
                sel = sorted((r for r in rows if r["budget"] != "" and float(r["budget"]) == b and _group(r) == g),
                             key=lambda r: r["params"])
                ax.plot([r["params"] for r in sel], [r["loss"] for r in sel], "o" + styles[gi % 4], color=f"C{bi}",
                        label=f"{g}, C={b:.2g}")
        ax.set(xscale="log", xlabel="parameters", ylabel="final validation loss", title="isoFLOP curves")
        ax.legend(fontsize=7)
        figs.append(("isoflop.png", fig))
    fig, ax = plt.subplots(figsize=(7, 5))
    for s in sorted({r["sparsity"] for r in rows}):
        sel = [r for r in rows if r["sparsity"] == s]
        ax.scatter([r["avg_params"] for r in sel], [r["loss"] for r in sel], label=f"sparsity {s or 'none'}")
    if "average_params" in res or law is not None:
        avg_law = Law(**res["average_params"]) if "average_params" in res else law
        xs = np.logspace(math.log10(min(r["avg_params"] for r in rows)), math.log10(max(r["avg_params"] for r in rows)),
                         50)
        tokens = float(np.median([r["tokens"] for r in rows]))
        ax.plot(xs, avg_law(xs, tokens), "k--", label=f"law at D={tokens:.3g}")
    ax.set(xscale="log", xlabel="average parameters over training", ylabel="final validation loss",
           title="dense and sparse runs on one law")
    ax.legend(fontsize=8)
    figs.append(("loss_vs_avg_params.png", fig))
    for name, f in figs:
        f.tight_layout()
        f.savefig(out / name, dpi=110)
        plt.close(f)
    (out / "fit.json").write_text(json.dumps(res, indent=1))
    table = ["| point | params | avg params | tokens | FLOPs | val loss | wall s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['id']} | {r['params']:,} | {float(r['avg_params']):,.0f} | {r['tokens']:,} | "
              f"{float(r['flops']):.3g} | {float(r['loss']):.4f} | {r['wall_seconds']} |" for r in rows]
    md = [f"# Sweep {sweep.path.name}", "", f"{len(rows)} finished points of {len(points)}.", "", "## Fits", "",
          "```", describe_fit(res), "```", "",
          "Fits from a handful of small CPU runs are noisy: intervals are 5-95% bootstrap percentiles; treat the "
          "exponents as a smoke test of the pipeline, not as a measurement.", "", "## Points", "", *table, "",
          "## Plots", "", *[f"![{n}]({n})" for n, _ in figs], ""]
    (out / "report.md").write_text("\n".join(md))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(sweep.out / "tb")) as tb:
        for r in rows:
            tb.add_hparams({"structure": r["structure"], "size": r["size"], "sparsity": r["sparsity"],
                            "params": float(r["params"]), "tokens": float(r["tokens"])},
                           {"hparam/val_loss": float(r["loss"]), "hparam/flops": float(r["flops"])},
                           run_name=r["id"])
    return out


# -- CLI ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "status", "collect", "fit", "report"])
    ap.add_argument("sweep", nargs="?", help="the sweep YAML (fit --points needs none)")
    ap.add_argument("--executor", choices=["local", "slurm"], default="local")
    ap.add_argument("--dry-run", action="store_true", help="run: print the commands (or the array script)")
    ap.add_argument("--points", help="fit: a CSV with params,tokens,loss (optional avg_params, flops, budget)")
    ap.add_argument("--out", help="fit: write the fitted laws as JSON here")
    ap.add_argument("--bootstrap", type=int, default=100, help="fit/report: bootstrap resamples for intervals")
    args = ap.parse_args(argv)
    try:
        if args.command == "fit" and args.points:
            res = fit(read_points(Path(args.points)), args.bootstrap)
        else:
            if not args.sweep:
                raise SweepError(f"{args.command}: the sweep file is required")
            sweep = load_sweep(args.sweep)
            points = plan(sweep)
            if args.command == "plan":
                print("| point | steps | params | non-embedding | tokens | train FLOPs |\n|---|---|---|---|---|---|")
                for p in points:
                    print(f"| {p.id} | {p.steps} | {p.params:,} | {p.params_nonemb:,} | {p.tokens:,} | {p.flops:.3g} |")
                return 0
            if args.command == "run":
                return run(sweep, points, args.executor, args.dry_run)
            if args.command == "status":
                print(status_table(points))
                return 0
            if args.command == "collect":
                rows = collect(points, sweep.out / "results.csv")
                print(f"{len(rows)} finished points -> {sweep.out / 'results.csv'}")
                return 0
            if args.command == "report":
                out = report(sweep, points, args.bootstrap)
                print(f"report: {out / 'report.md'}")
                return 0
            res = fit(collect(points, sweep.out / "results.csv"), args.bootstrap)
        print(describe_fit(res))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
