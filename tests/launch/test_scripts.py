"""launch/: dry runs print the exact commands; torchrun.sh and DeepSpeed's launcher (one node and two) really train
on two gloo processes."""

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
    assert len(steps) == 8
    text = out.stdout
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in text
    assert "pytest -q -m gpu tests" in text and "bench_kernels.py --dtype bf16" in text
    assert "bench_structures.py --config configs/gpt2-small-dense.yaml --steps 50" in text
    assert "bench_memory.py --device cuda --tables engines" in text
    assert not (ROOT / "runs" / "gpu-check").exists()
    bad = run(["bash", "tools/gpu_check.sh", "--steps", "many"])
    assert bad.returncode == 2 and "--steps many" in bad.stderr


def test_deepspeed_dry_run_prints_single_and_multi_node_commands(tmp_path):
    out = run(["bash", "launch/deepspeed.sh", "--dry-run", "--config", "configs/tiny-cpu.yaml", "--set",
               "parallel.dp=2"], NPROC="2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank --module pretrain.train "
                                  "--config configs/tiny-cpu.yaml --set parallel.dp=2 --set parallel.engine=deepspeed")
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    out = run(["bash", "launch/deepspeed.sh", "--dry-run", "--config", "configs/gpt2-small-blast.yaml"],
              HOSTFILE=str(hosts), EXCLUDE="node2:7", NNODES="2", MASTER_ADDR="node1", MASTER_PORT="29600")
    assert out.returncode == 0, out.stderr
    assert (f"deepspeed --hostfile {hosts} --exclude node2:7 --num_nodes 2 --master_addr node1 --master_port 29600 "
            "--no_local_rank --module pretrain.train --config configs/gpt2-small-blast.yaml") in out.stdout
    out = run(["bash", "launch/deepspeed.sh", "--dry-run"], HOSTFILE=str(hosts), NODE_RANK="1", MASTER_ADDR="node1")
    assert "--hostfile " in out.stdout and "--no_ssh --node_rank 1 --master_addr node1" in out.stdout
    bad = run(["bash", "launch/deepspeed.sh", "--dry-run"], INCLUDE="node1:0")
    assert bad.returncode == 2 and "set HOSTFILE too" in bad.stderr
    bad = run(["bash", "launch/deepspeed.sh", "--dry-run"], HOSTFILE=str(hosts), NODE_RANK="1")
    assert bad.returncode == 2 and "needs HOSTFILE and MASTER_ADDR" in bad.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_launcher_trains_with_zero_on_one_node_and_on_two(tiny_store, tmp_path):
    """ZeRO-3 at dp=2 by DeepSpeed's launcher: 2 processes on one node, then 2 "nodes" of one process each on
    this machine (a hostfile and ``NODE_RANK``, DeepSpeed's no-ssh mode, rendezvous over TCP): the same losses."""
    pytest.importorskip("deepspeed")
    from tests.conftest import losses

    def args(out):
        over = tiny_overrides(tiny_store, out, **{"train.steps": 3, "train.eval_interval": 3})
        return ["--config", "configs/tiny-cpu.yaml", *(x for o in over for x in ("--set", o)), "--set",
                "parallel.dp=2", "--set", "parallel.deepspeed.zero_stage=3"]

    out = run(["bash", "launch/deepspeed.sh", *args(tmp_path / "one")], NPROC="2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "one" / "checkpoints" / "step_000003" / "manifest.json").exists()
    hosts = tmp_path / "hosts"
    hosts.write_text("nodeA slots=1\nnodeB slots=1\n")
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "HOSTFILE": str(hosts),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    nodes = [subprocess.Popen(["bash", "launch/deepspeed.sh", *args(tmp_path / "two")], cwd=ROOT, text=True,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert losses(tmp_path / "two") == losses(tmp_path / "one") and sorted(losses(tmp_path / "one")) == [1, 2, 3]
