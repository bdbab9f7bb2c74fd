"""Shared fixtures: a small token store from the standard library's sources, tiny configs."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel tests run in its interpreter

from pretrain.metrics import read_metrics  # noqa: E402
from tools.prepare_data import main as prepare_main  # noqa: E402

RECIPE = Path(__file__).parents[1] / "configs" / "tiny-cpu.yaml"


def cli(overrides: list[str], recipe: Path | str = RECIPE) -> list[str]:
    """``--config recipe --set o1 --set o2 ...``: the trainer's command line for a list of overrides."""
    return ["--config", str(recipe), *(x for o in overrides for x in ("--set", o))]


def losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    """``key`` by step from a run's metrics.jsonl (the last record of each step)."""
    return {s: r[key] for s, r in read_metrics(run / "metrics.jsonl").items() if key in r}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A token store of 150 standard-library modules with a 512-piece tokenizer (built once per session)."""
    out = tmp_path_factory.mktemp("data") / "stdlib"
    assert prepare_main(["--out", str(out), "--max-docs", "150", "--vocab-size", "512", "--num-proc", "1"]) == 0
    return out


def tiny_overrides(store: Path, out_dir: Path, **extra) -> list[str]:
    """``--set`` overrides turning configs/tiny-cpu.yaml into a seconds-long test run."""
    base = {
        "data.paths": f"[{store}]", "data.seq_len": 64, "model.max_seq_len": 64, "model.d_model": 64,
        "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 192,
        "model.structure": "{default: {kind: dense}}", "train.global_batch": 8, "train.micro_batch": 4,
        "train.steps": 20, "train.eval_interval": 10, "train.eval_batches": 2, "train.out_dir": str(out_dir),
        "optim.warmup_steps": 5, "checkpoint.interval": 10, "log.interval": 1, "log.progress": "false",
        "log.tensorboard": "false", "log.peak_tflops": 1.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_args(tiny_store, tmp_path):
    """Build CLI arguments for a tiny run in a fresh directory: ``tiny_args(**overrides)``."""

    def make(out_dir: Path | None = None, **extra) -> list[str]:
        return cli(tiny_overrides(tiny_store, out_dir or tmp_path / "run", **extra))

    return make
