"""Checkpoints with torch.distributed.checkpoint: one directory per step, never half-written, any topology.

Layout of ``<out_dir>/checkpoints``::

    step_000100/          DCP shards (.metadata, *.distcp): model and optimizer state as global tensors
      meta.json           step, consumed samples, resolved config (dict), the topology that wrote it
      config.yaml         the same config, for people
      tokenizer.model     the sentencepiece model of the training data (export needs it)
      rng/rank_00000.pt   RNG states of each rank
    latest                name of the newest complete step directory, written last

Every rank writes its shards into ``.tmp-step_XXXXXX``; rank 0 renames it when all are done and then
replaces ``latest``, so a crash at any point leaves the previous checkpoint intact. Tensors are saved with
their tensor-parallel placements (DTensor), so a checkpoint written at one (dp, tp, pp) loads at any other.
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pretrain.config import UserError

# One process without a process group is a supported DCP mode; its notice is noise on every save/load.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

LATEST = "latest"
PREFIX = "step_"


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this run."""


def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "meta.json").is_file()


def read_meta(path: Path) -> dict:
    """``meta.json`` of a step directory; ``CheckpointError`` if it is not a complete checkpoint."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint step directory (needs .metadata and meta.json)")
    return json.loads((path / "meta.json").read_text())


def resolve_step_dir(path: str | Path) -> Path:
    """A step directory from either itself or a checkpoints root holding a ``latest`` marker."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    read_meta(path)
    return path


def check_model_config(meta: dict, model_config: dict, path: Path) -> None:
    """Refuse a checkpoint written for another model shape, listing every differing field."""
    diffs = _diff(meta["config"]["model"], model_config, "model")
    if diffs:
        raise CheckpointError(f"{path} was written for a different model:\n  " + "\n  ".join(diffs))


def _diff(saved, current, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: checkpoint has {saved!r}, config has {current!r}"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Checkpointer:
    """Saves and restores training state under one checkpoints root (collective when distributed)."""

    def __init__(self, root: Path, keep: int = 0):
        self.root, self.keep = Path(root), keep

    def complete_steps(self) -> list[Path]:
        """Complete step directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and is_complete(p))

    def latest(self) -> Path | None:
        marker = self.root / LATEST
        if marker.is_file():
            path = self.root / marker.read_text().strip()
            if is_complete(path):
                return path
        steps = self.complete_steps()  # marker missing or stale: fall back to the newest complete step
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, meta: dict, files: dict[str, str | bytes]) -> Path:
        """Write ``step_XXXXXX`` atomically. ``state`` is this rank's (DTensor) state dict; ``meta`` goes to
        meta.json and ``files`` beside it (written by rank 0)."""
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            for name, content in files.items():
                with open(tmp / name, "wb" if isinstance(content, bytes) else "w") as f:
                    f.write(content)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
            if final.exists():  # re-saving a step (e.g. after a resume): swap out the old directory first
                old = self.root / f".old-{step_name(step)}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            marker_tmp = self.root / f".{LATEST}.tmp"
            marker_tmp.write_text(final.name)
            os.replace(marker_tmp, self.root / LATEST)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep:
            for old in self.complete_steps()[: -self.keep]:
                shutil.rmtree(old)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, state: dict, model_config: dict, restore_rng: bool = True) -> dict:
        """Fill ``state`` (this rank's destination tensors) from ``path``; returns its meta."""
        meta = read_meta(path)
        check_model_config(meta, model_config, path)
        dcp.load(state, checkpoint_id=str(path))
        rng = Path(path) / "rng" / f"rank_{_rank():05d}.pt"
        if restore_rng and rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return meta


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
