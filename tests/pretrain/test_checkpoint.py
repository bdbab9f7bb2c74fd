"""Checkpoint integrity: damaged checkpoints are detected, named, and either skipped (auto resume, with the
losses of an uninterrupted run) or refused (an explicit path, exit 2); SIGKILL at random moments, including
inside a save, never changes the losses; nothing in a checkpoint directory is unpickled freely."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    MANIFEST,
    CheckpointError,
    GlobalView,
    ModelState,
    load_model,
    read_dcp_metadata,
    verify,
)
from pretrain.train import main
from tests.conftest import cli, losses, tiny_overrides

ROOT = Path(__file__).parents[2]
RUN = {"train.steps": 20, "checkpoint.interval": 5, "checkpoint.keep": 0, "train.eval_interval": 10}


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """An uninterrupted 20-step run and one stopped at step 15 (checkpoints at 5, 10, 15)."""
    base = tmp_path_factory.mktemp("ckpt")

    def args(out, **extra):
        return cli(tiny_overrides(tiny_store, out, **{**RUN, **extra}))

    assert main(args(base / "straight")) == 0
    assert main(args(base / "stopped", **{"train.exit_after_steps": 15})) == 0
    return {"straight": base / "straight", "stopped": base / "stopped", "args": args}


def _shard(step_dir: Path) -> Path:
    return next(step_dir.glob("*.distcp"))


def _truncate_shard(d):
    p = _shard(d)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p


def _garble_shard(d):  # same size, a few bytes changed in the middle: only the checksum can tell
    p = _shard(d)
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0x5A for b in data[mid:mid + 8])
    p.write_bytes(bytes(data))
    return p


def _unreadable_meta(d):
    p = d / "meta.json"
    p.write_text("{not json")
    return p


def _empty_metadata(d):
    p = d / ".metadata"
    p.write_bytes(b"")
    return p


def _missing_manifest(d):
    p = d / MANIFEST
    p.unlink()
    return p


def _garbled_manifest(d):
    p = d / MANIFEST
    p.write_text(p.read_text()[:40])
    return p


def _deleted_rng(d):
    p = next((d / "per_rank").glob("*.safetensors"))
    p.unlink()
    return p


DAMAGE = {"truncated shard": _truncate_shard, "garbled shard": _garble_shard, "unreadable meta.json": _unreadable_meta,
          "empty .metadata": _empty_metadata, "missing manifest": _missing_manifest,
          "garbled manifest": _garbled_manifest, "deleted per-rank file": _deleted_rng}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_skipped_with_identical_losses(kind, runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    damaged = DAMAGE[kind](run / "checkpoints" / "step_000015")
    assert verify(run / "checkpoints" / "step_000015")
    assert main(runs["args"](run) + ["--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoints' / 'step_000015'} is damaged" in err and str(damaged) in err, err
    assert "resuming from step_000010, the newest intact checkpoint" in err
    a, b = losses(runs["straight"]), losses(run)
    assert all(a[s] == b[s] for s in range(1, 21)), [(s, a[s], b[s]) for s in range(1, 21) if a[s] != b[s]]
    assert losses(runs["straight"], "val/loss") == losses(run, "val/loss")
    assert not verify(run / "checkpoints" / "step_000015")  # re-saved intact over the damaged one


@pytest.mark.parametrize("kind", ["truncated shard", "garbled shard", "unreadable meta.json", "missing manifest"])
def test_damaged_checkpoint_named_explicitly_stops_with_exit_2(kind, runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    step = run / "checkpoints" / "step_000015"
    damaged = DAMAGE[kind](step)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(runs["args"](run) + ["--resume", str(step)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {step} is damaged") and str(damaged) in err, err
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"], run)
    for step in (run / "checkpoints").glob("step_*"):
        _garble_shard(step)
    assert main(runs["args"](run) + ["--resume", "auto"]) == 2
    assert "every checkpoint under" in capsys.readouterr().err


def test_missing_explicit_checkpoint_is_exit_2(runs, tmp_path, capsys):
    assert main(runs["args"](tmp_path / "run") + ["--resume", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such checkpoint directory" in capsys.readouterr().err


def test_metadata_pickle_cannot_run_code(runs, tmp_path):
    """Even with a manifest rewritten to match, DCP's metadata pickle may only build DCP's own classes."""
    step = tmp_path / "step_000015"
    shutil.copytree(runs["stopped"] / "checkpoints" / "step_000015", step)
    witness = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    (step / ".metadata").write_bytes(pickle.dumps(Exploit()))
    manifest = json.loads((step / MANIFEST).read_text())
    from pretrain.checkpoint import file_digest

    manifest["files"][".metadata"] = file_digest(step / ".metadata")
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="is not allowed in checkpoint metadata"):
        read_dcp_metadata(step)
    with pytest.raises(CheckpointError, match="is not allowed in checkpoint metadata"):
        load_model(step)
    assert not witness.exists()
    # the real metadata still reads through the restricted unpickler
    assert read_dcp_metadata(runs["stopped"] / "checkpoints" / "step_000015").state_dict_metadata


def test_metadata_with_pickled_values_is_refused(runs, tmp_path):
    """DCP unpickles a non-tensor entry with ``torch.load(weights_only=False)``: a metadata that declares one is
    refused before any load (ours hold only tensors)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    step = tmp_path / "step_000015"
    shutil.copytree(runs["stopped"] / "checkpoints" / "step_000015", step)
    metadata = read_dcp_metadata(step)
    metadata.state_dict_metadata["progress.step"] = BytesStorageMetadata()
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="BytesStorageMetadata is not allowed"):
        read_dcp_metadata(step)


def test_per_rank_state_is_safetensors_and_never_pickled(runs):
    step = runs["stopped"] / "checkpoints" / "step_000015"
    files = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert "per_rank/rank_00000.safetensors" in files and not [f for f in files if f.endswith((".pt", ".pkl"))]
    manifest = json.loads((step / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [f for f in files if f != MANIFEST]


def test_model_loads_without_a_training_setup(runs):
    model, cfg, step = load_model(runs["stopped"] / "checkpoints")
    assert step.name == "step_000015" and cfg.train.steps == 20
    # the same tensors the trainer saved, read back through the model part alone
    again = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    from pretrain.checkpoint import Checkpointer

    Checkpointer.load(step, {"model": ModelState(again, {}, GlobalView(None))})
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


# -- SIGKILL stress test ----------------------------------------------------------------------------------

def _logged_step(run: Path) -> int:
    try:
        return max(losses(run), default=0)
    except (OSError, ValueError):  # the file is being appended to
        return 0


def _saving_since(ckpts: Path, launched: float) -> bool:
    """A save's temporary directory made by the process launched at ``launched`` exists (kills leave older
    ones behind until the next save of that step)."""
    for tmp in ckpts.glob(".tmp-step_*"):
        try:
            if tmp.stat().st_mtime >= launched:
                return True
        except FileNotFoundError:
            pass
    return False


def _wait(proc: subprocess.Popen, ready, deadline: float) -> bool:
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_including_inside_saves_keeps_losses_exact(tiny_store, tmp_path):
    """12 launches of one run with ``--resume auto``, each SIGKILLed at a random moment of one of three kinds:
    inside a save (a few ms after its temporary directory appears), 0-200 ms after a random later step
    was logged (a step, an evaluation or a save), or during start-up (possibly inside the resume). Then a
    last launch finishes the run: every step's loss equals the uninterrupted run's exactly."""
    extra = {"train.steps": 120, "checkpoint.interval": 2, "checkpoint.keep": 3, "train.eval_interval": 10}

    def args(out):
        return cli(tiny_overrides(tiny_store, out, **extra))

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(straight)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    ckpts = killed / "checkpoints"
    kills = []
    for attempt in range(12):
        kind = ("save", "step", "save", "startup")[attempt % 4]
        start_step = _logged_step(killed) if (killed / "metrics.jsonl").exists() else 0
        launched = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", *args(killed), "--resume", "auto"],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = launched + 120
        if kind == "save":
            _wait(proc, lambda launched=launched: _saving_since(ckpts, launched), deadline)
            time.sleep(rng.uniform(0.0, 0.01))
        elif kind == "step":
            target = start_step + rng.randint(1, 4)
            _wait(proc, lambda target=target: _logged_step(killed) >= target, deadline)
            time.sleep(rng.uniform(0.0, 0.2))  # the save right after the log, or into the next step
        else:  # imports and set-up take more than a second on any machine, so no step has run yet
            time.sleep(rng.uniform(0.2, 1.0))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), err.decode()[-3000:]
        if proc.returncode == -signal.SIGKILL:
            kills.append((kind, _logged_step(killed), _saving_since(ckpts, launched)))
    inside = sum(1 for kind, _, left in kills if left)
    assert len(kills) >= 10, kills
    assert inside >= 3, kills  # kills inside a save of this launch (its half-written directory left behind)
    assert _logged_step(killed) < 120, kills
    assert main(args(killed) + ["--resume", "auto"]) == 0
    a, b = losses(straight), losses(killed)
    assert all(a[s] == b[s] for s in range(1, 121)), [(s, a[s], b.get(s)) for s in range(1, 121) if a[s] != b.get(s)]
    assert losses(straight, "val/loss") == losses(killed, "val/loss")
    assert not any(ckpts.glob(".tmp-step_*"))  # the last save cleaned up what the kills left
    print("kills (kind, last logged step, half-written save left):", kills)
