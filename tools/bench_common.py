"""What the training benchmarks share: quiet short-run overrides, the median step throughput, ratios."""

import statistics
from pathlib import Path

from pretrain.metrics import read_metrics

WARMUP_STEPS = 2


def quiet_run(steps: int, out_dir: Path, eval_interval: int | None = None) -> list[str]:
    """Overrides for a benchmark run: ``steps`` steps into ``out_dir``, validation every ``eval_interval``
    (default: at the end), no intermediate checkpoints, per-step metrics, no progress bar or TensorBoard."""
    return [f"train.steps={steps}", f"train.out_dir={out_dir}", f"train.eval_interval={eval_interval or steps}",
            "checkpoint.interval=0", "checkpoint.keep=1", "log.interval=1", "log.progress=false",
            "log.tensorboard=false"]


def run_records(out_dir: Path) -> tuple[dict[int, dict], float]:
    """The run's metrics by step and its median tokens/s after the warm-up steps."""
    rec = read_metrics(Path(out_dir) / "metrics.jsonl")
    tok_s = statistics.median(r["perf/tokens_per_s"] for s, r in rec.items()
                              if s > WARMUP_STEPS and "perf/tokens_per_s" in r)
    return rec, tok_s


def ratio(a: float, b: float) -> str:
    """``a / b`` for a table cell; ``-`` when the baseline is zero."""
    return f"{a / b:.2f}" if b else "-"
