"""What the checkpoint manifest costs: hashing and verification against the DCP write and read themselves.

Usage:
    python tools/bench_checkpoint.py                 (512 MB of state, 3 repetitions)
    python tools/bench_checkpoint.py --mb 2048 --repeat 1 --dir /scratch/bench

Saves a state of ``--mb`` megabytes of fp32 tensors (shaped like a GPT's projections) through the
``Checkpointer`` on one process, then times, in the same run: the DCP write, the manifest (SHA-256 of every
file, plus fsync), the DCP read, and the verification on resume. Prints ms per GB and each cost as a ratio
to the DCP write or read it accompanies. With several ranks the hashing is split between them, so its wall
time divides by the number of ranks.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpoint import Checkpointer, GlobalView, ModelState, SafeFileSystemReader, file_digest, verify


def make_state(mb: int) -> dict[str, torch.Tensor]:
    shape = (1024, 1024)  # 4 MB per tensor
    return {f"layers.{i}.weight": torch.randn(shape) for i in range(max(1, mb // 4))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="state size in MB (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.mb < 4 or args.repeat < 1:
        print(f"error: --mb must be >= 4 (got {args.mb}) and --repeat >= 1 (got {args.repeat})", file=sys.stderr)
        return 2
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    tensors = make_state(args.mb)
    gb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    times: dict[str, list[float]] = {k: [] for k in ("save", "dcp write", "manifest", "dcp read", "verify")}
    try:
        for i in range(args.repeat):
            root = base / f"rep{i}"
            parts = {"model": ModelState(tensors, {}, GlobalView(None))}
            t0 = time.perf_counter()
            step_dir = Checkpointer(root).save(1, parts, {"consumed_samples": 0, "config": {}}, {})
            times["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the DCP write alone, into a scratch directory
            dcp.save(parts, checkpoint_id=str(root / "plain"))
            times["dcp write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in sorted(p for p in step_dir.rglob("*") if p.is_file()):
                file_digest(f, sync=True)
            times["manifest"].append(time.perf_counter() - t0)
            dst = {"model": ModelState({k: torch.empty_like(v) for k, v in tensors.items()}, {}, GlobalView(None))}
            t0 = time.perf_counter()
            dcp.load(dst, storage_reader=SafeFileSystemReader(str(step_dir)))
            times["dcp read"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert not verify(step_dir)
            times["verify"].append(time.perf_counter() - t0)
            shutil.rmtree(root)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{gb:.2f} GB of fp32 state, one process, median of {args.repeat}\n")
    print("| operation | seconds | ms/GB | x DCP write | x DCP read |")
    print("|---|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {1e3 * v / gb:,.0f} | {v / med['dcp write']:.2f} | {v / med['dcp read']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
