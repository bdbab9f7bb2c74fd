"""Shared settings of the multi-process training tests."""

import os
import subprocess
import sys
from pathlib import Path

from model.structured import example_spec
from tests.conftest import losses  # noqa: F401  (re-exported for the parallel tests)

ROOT = Path(__file__).parents[2]

STRUCTURES = {kind: example_spec(kind).flow() for kind in ("dense", "lowrank", "blockdiag", "monarch", "blast")}
"""The structures of the loss-equality tests (the sparse kinds are exact at the layer level instead)."""


VARIANTS = {"ckpt-full": ["train.activation_checkpointing=full"],
            "ckpt-selective": ["train.activation_checkpointing=selective"],
            "sp": ["parallel.sequence_parallel=true"], "compile": ["train.compile=true"],
            "aot": ["train.compile=true", "train.compile_backend=aot_eager"], "short": ["train.exit_after_steps=5"],
            **{f"z{k}": ["parallel.engine=deepspeed", f"parallel.deepspeed.zero_stage={k}"] for k in (1, 2, 3)},
            "offload": ["parallel.deepspeed.offload_optimizer=true"], "bf16": ["train.precision=bf16"]}
"""Extra overrides by label: a driver run named ``structure@label+label`` (e.g. ``blast@sp+ckpt-full``) adds them."""


def variant(name: str) -> tuple[str, list[str]]:
    """The structure of a driver run's name and its variants' overrides."""
    kind, _, labels = name.partition("@")
    return kind, [o for label in labels.split("+") if label for o in VARIANTS[label]]


def tiny(store: Path, steps: int = 20, **extra) -> list[str]:
    """Overrides for a tiny 8-layer model that divides every tested topology (tp up to 4, 8 stages)."""
    base = {"data.paths": f"[{store}]", "data.seq_len": 32, "model.max_seq_len": 32, "model.d_model": 64,
            "model.n_layers": 8, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 128,
            "model.vocab_size": 512, "train.steps": steps, "train.global_batch": 16, "train.micro_batch": 2,
            "train.eval_interval": 10, "train.eval_batches": 4, "optim.warmup_steps": 5, "optim.lr": 0.01,
            "checkpoint.interval": 10, "checkpoint.keep": 0, "log.interval": 1, "log.progress": "false",
            "log.tensorboard": "false", "log.peak_tflops": 1.0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def topology(dp: int, tp: int, pp: int, schedule: str = "1f1b", virtual: int = 1) -> list[str]:
    return [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}",
            f"parallel.virtual_stages={virtual}"]


def torchrun(nproc: int, out: Path, structures: list[str], overrides: list[str], resume: str = "none") -> None:
    """Run tests/parallel/driver.py on ``nproc`` gloo processes; raise with its output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "tests/parallel/driver.py"), "--out", str(out), "--structures", ",".join(structures),
           "--resume", resume]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
