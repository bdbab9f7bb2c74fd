"""Data preparation at scale, and the training loader against the trainer.

Usage:
    python tools/bench_data.py                                   # 1x, 10x, 100x the stdlib; 1 and 2 processes
    python tools/bench_data.py --scales 1,10 --num-procs 1,2 --plot docs/bench-data.png
    python tools/bench_data.py --scales 1 --loader-only          # just the loader-vs-trainer ratio

**Preparation.** A synthetic corpus of ``k`` copies of the standard library's ``.py`` files (links, so it costs no
disk) is prepared by ``tools/prepare_data.py`` in a subprocess at each scale ``k`` and ``--num-proc``. Peak memory
is the largest total proportional set size of the process tree (the tool and its workers, shared pages counted
once, sampled every 50 ms); tokens/s is end to end (reading, the tokenizer's sample and training, tokenizing,
writing). The table gives each run's memory against the smallest scale's (flat if memory is bounded) and its
throughput against one process at the same scale.

**Loader.** On the largest store prepared (a zarr store; stores above 1 GiB are read from disk per window, the
pretraining case), the training loader's samples/s at ``--seq-len`` is timed against the trainer's consumption:
forward and backward of ``--trainer-config`` (GPT-2 small by default) on one micro-batch here. Their ratio should be
well above 10 (the loader is never the bottleneck); ``train.prefetch`` overlaps the loader with the step.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]


def tree_pss(root_pid: int) -> int:
    """Proportional set size, in bytes, of ``root_pid`` and all its descendants (Linux ``/proc``): resident memory
    with the pages that forked workers share with their parent counted once, not once per process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
        stack += children.get(pid, [])
    return total


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """Run ``cmd``; its wall seconds, peak tree memory (PSS bytes), and output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return time.perf_counter() - start, peak[0], out


def make_corpus(root: Path, scale: int, files: list[Path], base: Path) -> Path:
    """``scale`` copies of ``files`` (symbolic links) under ``root``."""
    corpus = root / f"corpus-{scale}x"
    if not corpus.exists():
        for c in range(scale):
            for f in files:
                link = corpus / f"copy{c:03d}" / f.relative_to(base)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
    return corpus


def bench_prepare(work: Path, scales: list[int], procs: list[int], base_files: int, vocab: int) -> list[dict]:
    import sysconfig

    from tools.prepare_data import stdlib_files

    base = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()[:base_files or None]
    rows = []
    for scale in scales:
        corpus = make_corpus(work, scale, files, base)
        for n in procs:
            out = work / f"store-{scale}x-{n}p"
            cmd = [sys.executable, "tools/prepare_data.py", "--out", str(out), "--input", str(corpus),
                   "--vocab-size", str(vocab), "--num-proc", str(n), "--overwrite"]
            wall, peak, log = run_measured(cmd)
            tokens = int(zarr.open_group(str(out), mode="r").attrs["num_tokens"])
            rows.append({"scale": scale, "procs": n, "tokens": tokens, "wall": wall, "peak": peak, "store": out})
            print(f"  {scale}x, {n} process(es): {tokens:,} tokens in {wall:.1f} s, peak {peak / 2**20:.0f} MiB",
                  flush=True)
    return rows


def bench_loader(store: Path, config: str, seq_len: int, micro_batch: int, batches: int) -> dict:
    """The loader's and the trainer's samples/s at ``seq_len``."""
    from pretrain.config import DataConfig, load_config
    from pretrain.data import Corpus
    from pretrain.train import build_model

    corpus = Corpus(DataConfig(paths=[str(store)], seq_len=seq_len))
    corpus.train.batch(0, micro_batch)
    start = time.perf_counter()
    for b in range(batches):
        corpus.train.batch(1000 + b * micro_batch, micro_batch)
    loader = batches * micro_batch / (time.perf_counter() - start)
    cfg = load_config(config, [f"model.vocab_size={corpus.vocab_size}", f"data.seq_len={seq_len}"])
    model = build_model(cfg.model, torch.device("cpu"), 0)
    x, y = corpus.train.batch(0, micro_batch)

    def step():
        model(x, y).backward()  # the model's own loss, as the trainer computes it

    step()
    reps = 2
    start = time.perf_counter()
    for _ in range(reps):
        step()
    trainer = reps * micro_batch / (time.perf_counter() - start)
    return {"loader": loader, "trainer": trainer, "store_bytes": sum(p.stat().st_size for p in store.rglob("*")
                                                                     if p.is_file())}


def table(rows: list[dict]) -> str:
    lines = ["| scale | processes | tokens | wall s | tokens/s | peak MiB | memory x smallest | tokens/s x 1 process |",
             "|---|---|---|---|---|---|---|---|"]
    smallest = {r["procs"]: r["peak"] for r in rows if r["scale"] == min(x["scale"] for x in rows)}
    for r in rows:
        one = next((x for x in rows if x["scale"] == r["scale"] and x["procs"] == 1), None)
        speed = r["tokens"] / r["wall"]
        vs_one = f"{speed / (one['tokens'] / one['wall']):.2f}" if one else "-"
        lines.append(f"| {r['scale']}x | {r['procs']} | {r['tokens']:,} | {r['wall']:.1f} | {speed:,.0f} | "
                     f"{r['peak'] / 2**20:.0f} | {r['peak'] / smallest[r['procs']]:.2f} | {vs_one} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["procs"] for r in rows}):
        mine = sorted((r for r in rows if r["procs"] == n), key=lambda r: r["scale"])
        xs = [r["tokens"] for r in mine]
        a.plot(xs, [r["peak"] / 2**20 for r in mine], "o-", label=f"{n} process(es)")
        b.plot(xs, [r["tokens"] / r["wall"] for r in mine], "o-", label=f"{n} process(es)")
    for ax, title in ((a, "peak memory (MiB)"), (b, "tokens/s")):
        ax.set_xscale("log")
        ax.set_xlabel("corpus tokens")
        ax.set_title(title)
        ax.legend()
    a.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,10,100", help="corpus sizes, in copies of the standard library")
    ap.add_argument("--num-procs", default="1,2", help="--num-proc values of prepare_data")
    ap.add_argument("--base-files", type=int, default=0, help="use only the first N stdlib files (0: all)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--work", default=None, help="directory for the corpora and stores (default: a temporary one)")
    ap.add_argument("--trainer-config", default=str(ROOT / "configs/gpt2-small-dense.yaml"))
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--loader-batches", type=int, default=50)
    ap.add_argument("--loader-only", action="store_true", help="skip the preparation table (prepares the "
                    "largest scale once with the last --num-procs)")
    ap.add_argument("--plot", default=None, help="write memory and tokens/s against corpus size here (.png)")
    args = ap.parse_args(argv)
    try:
        scales = [int(x) for x in args.scales.split(",")]
        procs = [int(x) for x in args.num_procs.split(",")]
        assert min(scales) > 0 and min(procs) > 0
    except (ValueError, AssertionError):
        print(f"error: --scales {args.scales} / --num-procs {args.num_procs}: comma-separated positive integers",
              file=sys.stderr)
        return 2
    if not Path(args.trainer_config).is_file():
        print(f"error: --trainer-config {args.trainer_config}: no such file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.loader_only:
            scales, procs = [max(scales)], [procs[-1]]
        rows = bench_prepare(work, scales, procs, args.base_files, args.vocab_size)
        if not args.loader_only:
            print(table(rows))
            if args.plot:
                plot(rows, args.plot)
        largest = max(rows, key=lambda r: r["tokens"])
        r = bench_loader(largest["store"], args.trainer_config, args.seq_len, args.micro_batch, args.loader_batches)
        print(f"\nloader vs trainer at seq_len {args.seq_len}, micro-batch {args.micro_batch}, on the "
              f"{largest['scale']}x store ({r['store_bytes'] / 2**20:.0f} MiB on disk):")
        print("| loader samples/s | trainer samples/s | loader / trainer |\n|---|---|---|")
        print(f"| {r['loader']:,.1f} | {r['trainer']:,.2f} | {r['loader'] / r['trainer']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
