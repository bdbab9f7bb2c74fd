"""End-to-end training on the standard-library corpus: learning, resume equality, checkpoint safety."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.structured import REGISTRY, example_spec
from pretrain.metrics import read_metrics
from pretrain.train import main

STRUCTURES = {kind: example_spec(kind).flow() for kind in REGISTRY}


def losses(run: Path, key: str = "train/loss") -> dict[int, float]:
    return {s: r[key] for s, r in read_metrics(run / "metrics.jsonl").items() if key in r}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_100_steps_drive_validation_loss_well_down(kind, tiny_args, tmp_path):
    run = tmp_path / kind
    args = tiny_args(run, **{"model.structure": f"{{default: {STRUCTURES[kind]}}}", "train.steps": 100,
                             "train.eval_interval": 50, "checkpoint.interval": 0, "optim.lr": 0.01})
    assert main(args) == 0
    val = losses(run, "val/loss")
    # ln(512) = 6.24 at init; a model that learns nothing stays near it.
    assert val[0] > 6.0
    assert val[100] < val[0] - 2.0, val
    assert val[100] < val[50] < val[0]


def test_clean_stop_and_resume_reproduce_uninterrupted_losses(tiny_args, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    spec = {"model.structure": "{attn: {kind: lowrank, rank: 16}, mlp: {kind: blast, blocks: 4, rank: 8}}",
            "model.tie_embeddings": "true"}
    assert main(tiny_args(straight, **spec)) == 0
    assert main(tiny_args(split, **spec, **{"train.exit_after_steps": 7})) == 0
    assert (split / "checkpoints" / "step_000007").is_dir()
    assert main(tiny_args(split, **spec) + ["--resume", "auto"]) == 0
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert losses(straight, "val/loss") == losses(split, "val/loss")


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tiny_args, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = {"train.steps": 40, "checkpoint.interval": 5, "checkpoint.keep": 0}
    assert main(tiny_args(straight, **extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", *tiny_args(killed, **extra)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (marker.is_file() and marker.read_text().strip() >= "step_000015"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.is_file(), "the run never wrote a checkpoint"
    killed_at = max(losses(killed))
    assert killed_at < 40, "the run finished before it could be killed"
    assert main(tiny_args(killed, **extra) + ["--resume", "auto"]) == 0
    a, b = losses(straight), losses(killed)
    assert all(a[s] == b[s] for s in range(1, 41))


def test_existing_checkpoints_are_never_clobbered(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(run, **{"train.steps": 10})) == 0
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    assert main(tiny_args(run, **{"train.steps": 10})) == 2
    assert "already holds checkpoints (newest step_000010)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before


def test_checkpoint_of_another_model_shape_is_refused(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(run, **{"train.steps": 10})) == 0
    code = main(tiny_args(run, **{"train.steps": 20, "model.d_model": 128}) + ["--resume", "auto"])
    assert code == 2
    err = capsys.readouterr().err
    assert "was written for a different model" in err and "model.d_model: checkpoint has 64, config has 128" in err


def test_metrics_reach_tensorboard_and_jsonl(tiny_args, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_args(run, **{"train.steps": 10, "log.tensorboard": "true"})) == 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    rec = read_metrics(run / "metrics.jsonl")
    keys = ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "perf/mfu", "val/loss")
    for key in keys:
        assert key in rec[10], key
    assert rec[0]["model/params"] > 0 and rec[0]["model/flops_per_token"] > 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_000010" / "tokenizer.model").is_file()
