"""Memory per rank: at start-up (sharded initialisation against full-init-then-slice) and in a training step
(activation checkpointing, sequence parallelism).

Usage:
    python tools/bench_memory.py                                   # gpt2-small-blast shapes, every table
    python tools/bench_memory.py --config configs/gpt2-small-dense.yaml --plot docs/bench-memory.png
    python tools/bench_memory.py --tables startup --topologies 1x1,2x1,4x1
    python tools/bench_memory.py --tables engines --engine-dp 2,4 --plot-engines docs/bench-memory-engines.png

Memory is what ``torch.distributed._tools.mem_tracker.MemTracker`` counts: the bytes of live tensors on this
rank (CPU here, CUDA on a GPU), its peak while the model is built or while a step runs. Each topology runs under
torchrun with tp x pp gloo processes (OMP_NUM_THREADS=1), or with ``--device cuda`` NCCL processes, one GPU each.

- ``startup``: for each ``TPxPP``, the peak while building the model the Trainer's way (on ``meta``, each rank
  fills only its shards and stages) and the old way (every rank initialises the whole model, then slices it),
  the largest rank of each, against the full model's bytes and the ideal ``full / (tp x pp)``. Replicated parts
  (norms, replicated structured factors, the embedding and head on pp's end stages) keep the sharded peak above
  the ideal; the transient is one projection and one chunk of embedding rows.
- ``activations``: one forward and backward of ``--micro-batch`` sequences of ``--seq-len`` tokens at (1, 1, 1)
  under ``train.activation_checkpointing`` none, full and selective: the peak of activation memory (tensors the
  forward keeps) and of the step above the weights, with the step time, each as a ratio to none.
- ``sequence``: the same step at tp=2 with and without ``parallel.sequence_parallel`` (per rank).
- ``engines``: at each ``--engine-dp`` and ``--engine-precisions``, the native engine's AdamW (block-wise
  ZeRO-1) against DeepSpeed's ZeRO-1, 2 and 3, ZeRO-2 with the optimizer offloaded and ZeRO-3 with parameters and
  optimizer offloaded: the bytes a rank keeps after a step (parameters, gradients, optimizer state), the part of
  them left on the training device when what DeepSpeed offloads goes to the host (computed here, where the device
  is the host; measured with ``--device cuda``: the bytes on the GPU), and its peak on the training device while
  building and stepping.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TABLES = ("startup", "activations", "sequence", "engines")
_DS = {"parallel.engine": "deepspeed"}
ENGINES = {"native": {}, **{f"zero{k}": {**_DS, "parallel.deepspeed.zero_stage": k} for k in (1, 2, 3)},
           "zero2+offload": {**_DS, "parallel.deepspeed.zero_stage": 2, "parallel.deepspeed.offload_optimizer": "true"},
           "zero3+offload": {**_DS, "parallel.deepspeed.zero_stage": 3, "parallel.deepspeed.offload_optimizer": "true",
                             "parallel.deepspeed.offload_params": "true"}}
"""The engines table's rows: the native AdamW (block-wise ZeRO-1) and DeepSpeed's stages, with offload."""
MiB = 2**20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt2-small-blast.yaml")
    ap.add_argument("--vocab-size", type=int, default=32000, help="model.vocab_size (the recipes take the store's)")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma list from {list(TABLES)}")
    ap.add_argument("--topologies", default="1x1,2x1,4x1,1x2,1x4,2x2", help="TPxPP list for the start-up table")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--engine-dp", default="2,4", help="data-parallel sizes of the engines table")
    ap.add_argument("--engine-precisions", default="fp32,bf16", help="train.precision values of the engines table")
    ap.add_argument("--plot", help="PNG of the start-up table (peak per rank against tp x pp)")
    ap.add_argument("--plot-engines", help="PNG of the engines tables (kept, on the device, peak per engine)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _overrides(args, tp: int = 1, pp: int = 1, **extra) -> list[str]:
    base = {"model.vocab_size": args.vocab_size, "data.seq_len": args.seq_len,
            "model.max_seq_len": max(args.seq_len, 1024), "train.micro_batch": args.micro_batch,
            "train.global_batch": args.micro_batch * pp, "parallel.tp": tp, "parallel.pp": pp,
            "train.device": args.device}
    base.update(extra)
    return [*(f"{k}={v}" for k, v in base.items()), *args.overrides]


def _peak(tracker, kind: str = "peak", device: str | None = None) -> int:
    """The tracked bytes on the devices that hold memory (the ``meta`` model is tracked too, holds none), the
    largest of them, or of the devices of type ``device`` only."""
    return max((stats["Total"] for dev, stats in tracker.get_tracker_snapshot(kind).items()
                if dev.type != "meta" and (device is None or dev.type == device)), default=0)


def _total(tracker, kind: str = "current") -> int:
    """The tracked bytes summed over the devices (on a GPU: device and host)."""
    return sum(stats["Total"] for dev, stats in tracker.get_tracker_snapshot(kind).items() if dev.type != "meta")


def _worker(args, kind: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from parallel.mesh import ParallelDims
    from pretrain.config import load_config
    from pretrain.train import build_meta, build_parallel

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # also for one process: the results are gathered the same way
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    result = {}
    if kind.startswith("startup"):
        tp, pp = (int(v) for v in kind.split(":")[1].split("x"))
        cfg = load_config(args.config, _overrides(args, tp, pp))
        dims = ParallelDims(1, tp, pp)
        dims.build_mesh(device.type)
        for sharded in (True, False):
            tracker = MemTracker()
            with tracker:
                model, *_ = build_parallel(cfg, dims, device, cfg.train.global_batch, sharded=sharded)
            local = sum(t.numel() * t.element_size() for t in model.named_tensors().values())
            result["sharded" if sharded else "full"] = _peak(tracker)
            result["local"] = local
            del model
        meta = build_meta(cfg.model)
        result["model"] = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    elif kind.startswith("engines"):
        from pretrain.optim import build_optimizer
        from pretrain.train import deepspeed_optimizer

        dp, precision = int(kind.split(":")[1]), kind.split(":")[2]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        for name, extra in ENGINES.items():
            cfg = load_config(args.config, _overrides(args, 1, 1, **{"parallel.dp": dp, "train.precision": precision,
                                                                     "train.global_batch": dp * args.micro_batch},
                                                      **extra))
            dims = ParallelDims(dp, 1, 1)
            dims.build_mesh(device.type)
            tracker = MemTracker()
            with tracker:
                model, *_ = build_parallel(cfg, dims, device, args.micro_batch)
                gen = torch.Generator().manual_seed(0)
                x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=gen).to(device)
                if cfg.parallel.engine == "deepspeed":
                    opt = deepspeed_optimizer(cfg, model, args.micro_batch, precision == "bf16")
                    opt.train_batch(x, x, autocast)
                    offloaded = opt.offloaded_bytes()
                else:
                    opt = build_optimizer(cfg.optim, model.named_parameters(), model.param_groups(0.1),
                                          model.dp_group, None, None, model.placements)
                    model.forward_backward(x, x, autocast)
                    model.reduce_and_clip(1.0, opt.owners)
                    opt.step()
                    offloaded = 0
                kept = _total(tracker)
                # on a GPU the tracker sees the device apart; here the device is the host, so subtract the offload
                on_device = (_peak(tracker, "current", "cuda") if device.type == "cuda" else kept - offloaded)
            result[name] = {"kept": kept, "peak": _peak(tracker, "peak", device.type), "device": on_device}
            del model, opt
    else:
        variants = {"activations": [("none", {}), ("full", {"train.activation_checkpointing": "full"}),
                                    ("selective", {"train.activation_checkpointing": "selective"})],
                    "sequence": [("tp", {}), ("tp+sp", {"parallel.sequence_parallel": "true"})]}[kind]
        tp = 2 if kind == "sequence" else 1
        for name, extra in variants:
            cfg = load_config(args.config, _overrides(args, tp, 1, **extra))
            dims = ParallelDims(1, tp, 1)
            dims.build_mesh(device.type)
            model, *_ = build_parallel(cfg, dims, device, args.micro_batch)
            gen = torch.Generator().manual_seed(0)
            x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=gen).to(device)
            y = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=gen).to(device)
            autocast = torch.autocast(device.type, enabled=False)
            model.forward_backward(x, y, autocast)  # warm-up (lazy init, grads)
            tracker = MemTracker()
            for stage in model.stages.values():
                tracker.track_external(stage)
            with tracker:
                before = _peak(tracker, "current")
                start = time.perf_counter()
                model.forward_backward(x, y, autocast)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            peak = tracker.get_tracker_snapshot("peak")
            act = max(stats.get(_act_key(stats), 0) for dev, stats in peak.items() if dev.type != "meta")
            result[name] = {"step": _peak(tracker) - before, "act": act, "s": seconds}
            del model
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def _act_key(stats: dict):
    return next(k for k in stats if getattr(k, "value", None) == "Activation")


def _launch(args, argv, kind: str, nproc: int, tmp: str) -> list[dict]:
    out = Path(tmp) / f"{kind.replace(':', '-')}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", kind, str(out), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _startup(args, argv, tmp) -> list[dict]:
    rows = []
    print(f"\nstart-up peak per rank ({args.config}, vocab {args.vocab_size}); the largest rank, MiB\n")
    print("| tp x pp | full model | ideal full/(tp pp) | sharded init | x full | x ideal | full init then slice "
          "| x full | rank's own tensors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for topo in args.topologies.split(","):
        tp, pp = (int(v) for v in topo.split("x"))
        ranks = _launch(args, argv, f"startup:{topo}", tp * pp, tmp)
        model = ranks[0]["model"]
        sharded, full = max(r["sharded"] for r in ranks), max(r["full"] for r in ranks)
        ideal = model / (tp * pp)
        local = max(r["local"] for r in ranks)
        rows.append({"tp": tp, "pp": pp, "model": model, "sharded": sharded, "full": full, "ideal": ideal})
        print(f"| {tp} x {pp} | {model / MiB:,.0f} | {ideal / MiB:,.0f} | {sharded / MiB:,.0f} | "
              f"{sharded / model:.2f} | {sharded / ideal:.2f} | {full / MiB:,.0f} | {full / model:.2f} | "
              f"{local / MiB:,.0f} |", flush=True)
    return rows


def _steps(args, argv, kind: str, tmp) -> None:
    nproc = 2 if kind == "sequence" else 1
    ranks = _launch(args, argv, kind, nproc, tmp)
    where = "tp=2, per rank (the larger)" if kind == "sequence" else "(1, 1, 1)"
    print(f"\n{kind}: one forward+backward of {args.micro_batch} x {args.seq_len} tokens at {where}; MiB\n")
    _ratio_table(ranks, "variant", "first", [("act", "activations", MiB, ",.1f"),
                                             ("step", "step above weights", MiB, ",.1f"), ("s", "step s", 1, ".2f")])


def _engines(args, argv, tmp) -> list[tuple[str, dict]]:
    """The engines tables; (title, the largest rank's values by engine) per dp and precision."""
    groups = []
    for dp in (int(v) for v in args.engine_dp.split(",")):
        for precision in args.engine_precisions.split(","):
            ranks = _launch(args, argv, f"engines:{dp}:{precision}", dp, tmp)
            print(f"\nengines at dp={dp}, {precision} (the largest rank), after one AdamW step of {args.micro_batch} x "
                  f"{args.seq_len} tokens; MiB. 'on the device' is what stays when offloaded bytes leave (on a GPU)\n")
            worst = _ratio_table(ranks, "engine", "native", [("kept", "kept after the step", MiB, ",.0f"),
                                                             ("device", "on the device", MiB, ",.0f"),
                                                             ("peak", "peak", MiB, ",.0f")])
            groups.append((f"dp={dp}, {precision}", worst))
    return groups


def _plot_engines(groups: list[tuple[str, dict]], path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), sharey=True, squeeze=False)
    for ax, (title, values) in zip(axes[0], groups):
        names = list(values)
        xs = range(len(names))
        for shift, key, label in ((-0.27, "kept", "kept after the step"), (0.0, "device", "on the device"),
                                  (0.27, "peak", "peak")):
            ax.bar([x + shift for x in xs], [values[n][key] / MiB for n in names], 0.27, label=label)
        ax.set_xticks(list(xs), names, rotation=35, ha="right")
        ax.set_title(title)
    axes[0][0].set_ylabel("MiB per rank")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def _ratio_table(ranks: list[dict], label: str, base_name: str,
                 columns: list[tuple[str, str, float, str]]) -> dict[str, dict]:
    """One row per variant (the first is the baseline, ``base_name``): each column's value, the largest over
    ranks, scaled and formatted, then its ratio to the baseline's. ``columns``: (key, title, scale, format).
    Returns the largest values over ranks by variant and key."""
    print(f"| {label} | " + " | ".join(f"{title} | x {base_name}" for _, title, _, _ in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    names = list(ranks[0])
    worst = {name: {key: max(r[name][key] for r in ranks) for key, *_ in columns} for name in names}
    base = worst[names[0]]
    for name in names:
        cells = [f"{worst[name][key] / scale:{fmt}} | {worst[name][key] / base[key]:.2f}"
                 for key, _, scale, fmt in columns]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return worst


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['tp']}x{r['pp']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["full"] / MiB for r in rows], 0.27, label="full init then slice")
    ax.bar(list(xs), [r["sharded"] / MiB for r in rows], 0.27, label="sharded init")
    ax.bar([x + 0.27 for x in xs], [r["ideal"] / MiB for r in rows], 0.27, label="full / (tp x pp)")
    ax.set_xticks(list(xs), labels)
    ax.set_xlabel("tp x pp")
    ax.set_ylabel("start-up peak per rank (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        _worker(args, *args.worker)
        return 0
    tables = args.tables.split(",")
    errors = []
    if any(t not in TABLES for t in tables):
        errors.append(f"--tables {args.tables}: allowed values {list(TABLES)}")
    if not all(len(t.split("x")) == 2 and all(v.isdigit() and int(v) > 0 for v in t.split("x"))
               for t in args.topologies.split(",")):
        errors.append(f"--topologies {args.topologies}: a comma list of TPxPP, e.g. 1x1,2x1")
    if not all(v.isdigit() and int(v) > 0 for v in args.engine_dp.split(",")):
        errors.append(f"--engine-dp {args.engine_dp}: a comma list of positive integers, e.g. 2,4")
    if any(v not in ("fp32", "bf16") for v in args.engine_precisions.split(",")):
        errors.append(f"--engine-precisions {args.engine_precisions}: allowed values ['fp32', 'bf16']")
    if args.device not in ("cpu", "cuda"):
        errors.append(f"--device {args.device}: allowed values ['cpu', 'cuda']")
    if not Path(args.config).is_file():
        errors.append(f"--config {args.config}: no such file")
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 2
    worker_argv = [a for a in argv if a not in ("--plot", "--plot-engines") and not a.endswith(".png")]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        rows = _startup(args, worker_argv, tmp) if "startup" in tables else []
        for kind in ("activations", "sequence"):
            if kind in tables:
                _steps(args, worker_argv, kind, tmp)
        groups = _engines(args, worker_argv, tmp) if "engines" in tables else []
    if args.plot and rows:
        _plot(rows, args.plot)
    if args.plot_engines and groups:
        _plot_engines(groups, args.plot_engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
