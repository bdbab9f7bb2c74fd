"""TensorBoard scalars, a JSON-lines log, throughput and MFU, and the progress bar."""

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                   "V100": 125.0, "4090": 165.0, "3090": 71.0}


def measure_cpu_tflops(seconds: float = 0.3, n: int = 1024) -> float:
    """fp32 matmul throughput of this machine, the reference for MFU on CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """Configured peak, a known GPU's bf16 peak, or the measured CPU matmul throughput."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return measure_cpu_tflops()


class Metrics:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` and drives the progress bar (one process)."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, progress: bool, tensorboard: bool,
                 enabled: bool = True):
        self.enabled = enabled
        if not enabled:  # ranks other than 0 record nothing
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        _drop_partial_line(path)
        self._jsonl = path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tb"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         disable=not progress, dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 5.0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record scalars for ``step`` (tags like ``train/loss``)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)

    def advance(self, step: int, postfix: dict[str, str]) -> None:
        if not self.enabled:
            return
        self._bar.n = step
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed run left unfinished, so the resumed run appends whole records."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: Path) -> dict[int, dict]:
    """The last record of every step in a ``metrics.jsonl`` (later runs of a resumed job win)."""
    records: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        records.setdefault(rec["step"], {}).update(rec)
    return records
