"""launch/: dry runs print the exact commands; torchrun.sh really trains on two gloo processes."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

ROOT = Path(__file__).parents[2]


def run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the scripts' own default is tested
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**base, **env}, timeout=600)


def test_torchrun_dry_run_prints_the_command():
    out = run(["bash", "launch/torchrun.sh", "--dry-run", "--config", "configs/tiny-cpu.yaml",
               "--set", "parallel.dp=2"], NPROC="2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 "
                                  "-m pretrain.train --config configs/tiny-cpu.yaml --set parallel.dp=2")


def test_slurm_dry_run_prints_rendezvous_resume_and_requeue(tmp_path):
    out = run(["bash", "launch/slurm.sbatch", "--config", "configs/gpt2-small-blast.yaml", "--set", "parallel.dp=16"],
              DRY_RUN="1", SLURM_JOB_ID="777", SLURM_NNODES="2", HEAD_NODE="gpu-a", SLURM_SUBMIT_DIR=str(ROOT))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert ("srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m torch.distributed.run --nnodes 2 "
            "--nproc-per-node 8 --rdzv-id 777 --rdzv-backend c10d --rdzv-endpoint gpu-a:29500 -m pretrain.train "
            "--config configs/gpt2-small-blast.yaml --set parallel.dp=16 --set train.out_dir=runs/structorch-777 "
            "--resume auto") in text
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in text and "scontrol requeue 777" in text
    assert not (ROOT / "runs" / "structorch-777").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_torchrun_script_trains_data_parallel(tiny_store, tmp_path):
    args = []
    for o in tiny_overrides(tiny_store, tmp_path / "run", **{"train.steps": 3, "parallel.dp": 2}):
        args += ["--set", o]
    out = run(["bash", "launch/torchrun.sh", "--config", "configs/tiny-cpu.yaml", *args], NPROC="2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done at step 3" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_000003").is_dir()


def test_gpu_check_dry_run_prints_every_step():
    out = run(["bash", "tools/gpu_check.sh", "--dry-run", "--cuda", "cu126", "--steps", "50"])
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("+ [")]
    assert len(steps) == 7
    text = out.stdout
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in text
    assert "pytest -q -m gpu tests" in text and "bench_kernels.py --dtype bf16" in text
    assert "bench_structures.py --config configs/gpt2-small-dense.yaml --steps 50" in text
    assert not (ROOT / "runs" / "gpu-check").exists()
    bad = run(["bash", "tools/gpu_check.sh", "--steps", "many"])
    assert bad.returncode == 2 and "--steps many" in bad.stderr
