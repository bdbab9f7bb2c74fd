"""Train several structures, one after another, in one torchrun job (used by the multi-process tests).

Usage (from the repository root):
    torchrun --standalone --nproc-per-node 8 tests/parallel/driver.py --out DIR --structures dense,blast \\
        --set parallel.dp=2 --set parallel.tp=2 --set parallel.pp=2 [--set ...]

Each structure runs ``pretrain.train.Trainer`` with ``train.out_dir=DIR/<structure>``; rank 0 writes its
metrics there. A name that is not one of ``common.STRUCTURES`` labels a run whose ``model.structure`` is among
the ``--set`` overrides; ``name@sp+ckpt-full`` adds the overrides of those labels (``common.VARIANTS``).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.train import Trainer
from tests.parallel.common import STRUCTURES, variant


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--structures", required=True)
    ap.add_argument("--resume", default="none")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    for name in args.structures.split(","):
        kind, extra = variant(name)
        structure = [f"model.structure={{default: {STRUCTURES[kind]}}}"] if kind in STRUCTURES else []
        overrides = [*args.overrides, *structure, *extra, f"train.out_dir={Path(args.out) / name}",
                     f"checkpoint.resume={args.resume}"]
        torch._dynamo.reset()  # a compiled run compiles afresh, as in a job of its own
        Trainer(load_config(None, overrides)).fit()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
