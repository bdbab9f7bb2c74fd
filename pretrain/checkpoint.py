"""Checkpoints: the training state as stateful parts, one verified DCP directory per step, any topology.

Every part of the training state is a ``Stateful`` (``state_dict()`` / ``load_state_dict()``, TorchTitan's
contract): the model (``ModelState``), the optimizer (``OptimizerState``), the loop's counters and data
position (``pretrain.train.Progress``), the RNG (``RNGState``). The trainer hands the ``Checkpointer`` a dict
of them; adding a kind of state (a sparsity schedule, say) is one more entry. The parts give *global* views:
local tensors become DTensors over the tensor-parallel mesh (``GlobalView``) with the placements the layers
declared, so ``torch.distributed.checkpoint`` reshards between any two (dp, tp, pp). Parts marked
``per_rank`` (the RNG) are saved by every rank to its own safetensors file instead.

Layout of ``<out_dir>/checkpoints``::

    step_000100/
      .metadata, __*_*.distcp   DCP: every part's tensors as global tensors
      per_rank/rank_00000.safetensors   per-rank parts (RNG)
      meta.json                 step, consumed samples, resolved config, the topology that wrote it
      config.yaml               the same config, for people
      tokenizer.model           the training data's tokenizer (export needs it): a sentencepiece model, or
                                tokenizer.json + tokenizer_config.json (the tokenizers library)
      manifest.json             size and SHA-256 of every file above, written last
    latest                      name of the newest step directory, a hint (the newest intact one wins)

Integrity: all ranks write into ``.tmp-step_XXXXXX``; then each rank hashes a share of the files, rank 0
writes ``manifest.json`` and renames the directory into place, then replaces ``latest``. A crash at any point
leaves the previous checkpoints intact. On resume the manifest is verified (each rank hashes a share; SHA-256
runs at about 0.6 s per GB on one core here, divided by the number of ranks), a damaged newest checkpoint is
reported with the file named and the run falls back to the newest intact one; a damaged checkpoint named
explicitly stops the run (``CheckpointError``, exit 2).

Safety: nothing here unpickles arbitrary objects. Per-rank parts are safetensors, counters are tensors (DCP
pickles non-tensor values), and DCP's ``.metadata`` (a pickle by design) is read with an unpickler that only
admits DCP's metadata classes, after the manifest has matched.
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.device_mesh import DeviceMesh

from pretrain.config import UserError

# One process without a process group is a supported DCP mode; its notice is noise on every save/load.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

LATEST = "latest"
PREFIX = "step_"
MANIFEST = "manifest.json"
META = "meta.json"
FORMAT = "structorch-checkpoint-v2"
STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")
HASH_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this run (damaged, missing, or written for another model)."""


@runtime_checkable
class Stateful(Protocol):
    """A part of the training state (``torch.distributed.checkpoint.stateful.Stateful``)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


# -- global views: local tensors <-> DTensors with their tensor-parallel placements ------------------------

class GlobalView:
    """Turns a local tensor into its global view over the tensor-parallel mesh, and back.

    ``of(t, dim)``: a DTensor sharded on ``dim`` (``Shard(dim)``, even chunks in tp-rank order) or replicated
    (``dim`` None) that shares ``t``'s storage, so DCP loads in place; ``t`` itself for one process.
    """

    def __init__(self, tp_mesh: DeviceMesh | None):
        self.mesh = tp_mesh

    def of(self, t: torch.Tensor, dim: int | None):
        if self.mesh is None:
            return t
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if dim is None:
            return DTensor.from_local(t, self.mesh, [Replicate()], run_check=False)
        shape = list(t.shape)
        shape[dim] *= self.mesh.size()
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    @staticmethod
    def local(t) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    src = GlobalView.local(src)
    if src.data_ptr() != dst.data_ptr():
        with torch.no_grad():
            dst.copy_(src.view_as(dst))


class ModelState:
    """Parameters and persistent buffers by name, as global views of this rank's tensors.

    ``tensors``: name -> local tensor (a ``ParallelModel``'s ``named_tensors()`` or a plain module's
    ``state_dict(keep_vars=True)``); ``placements``: name -> split dim (missing or None: replicated).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], placements: dict[str, int | None], view: GlobalView):
        self.tensors, self.placements, self.view = tensors, placements, view

    def state_dict(self) -> dict:
        return {k: self.view.of(v.detach(), self.placements.get(k)) for k, v in self.tensors.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, t in self.tensors.items():
            _copy_into(t.data, state_dict[name])


class OptimizerState:
    """A block-wise optimizer's owned blocks as global views.

    Elementwise state (``optimizer.elementwise`` keys) takes its parameter's placement and stacked state
    (``optimizer.stacked``: a leading dimension, then the parameter's shape) the same placement one dimension
    further, so both reshard over any (dp, tp, pp). Block state of a replicated parameter is replicated; that of
    a tensor-parallel shard is stacked over tp (global shape ``[tp, ...]``), so it reshards over dp and pp and
    loads at the same tp.
    """

    def __init__(self, optimizer, placements: dict[str, int | None], view: GlobalView):
        self.optimizer, self.placements, self.view = optimizer, placements, view

    def _global(self, name: str, key: str, t: torch.Tensor):
        dim = self.placements.get(name)
        if key in self.optimizer.elementwise or dim is None:
            return self.view.of(t, dim)
        if key in self.optimizer.stacked:
            return self.view.of(t, dim + 1)
        return self.view.of(t.unsqueeze(0), 0)

    def state_dict(self) -> dict:
        local = self.optimizer.state_dict()
        blocks = {name: {k: self._global(name, k, v) for k, v in block.items()}
                  for name, block in local["blocks"].items()}
        return {"step": local["step"], "blocks": blocks}

    def load_state_dict(self, state_dict: dict) -> None:
        blocks = {name: {k: GlobalView.local(v) for k, v in block.items()}
                  for name, block in state_dict["blocks"].items()}
        self.optimizer.load_state_dict({"step": GlobalView.local(state_dict["step"]), "blocks": blocks})


class RNGState:
    """This rank's RNG states (CPU and every CUDA device); saved per rank, restored where the rank exists."""

    per_rank = True

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        devices = sorted(int(k.split(".")[1]) for k in state_dict if k.startswith("cuda."))
        cuda = [state_dict[f"cuda.{i}"] for i in devices]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# -- DCP's .metadata without arbitrary unpickling ------------------------------------------------------

_DCP_META = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *((_DCP_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "ChunkStorageMetadata",
                               "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
"""Every global a DCP ``.metadata`` pickle of ours refers to (besides dtypes); exact names, so no attribute chain
(``module.os.system``) can be reached. ``BytesStorageMetadata`` is left out on purpose: our checkpoints hold
only tensors, and DCP loads a bytes entry with ``torch.load(weights_only=False)``."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                              torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(step_dir: Path) -> Metadata:
    """DCP's ``.metadata`` of ``step_dir``, unpickled with only DCP's own classes admitted."""
    try:
        with open(step_dir / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{step_dir / '.metadata'}: unreadable DCP metadata ({e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{step_dir / '.metadata'}: not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``read_metadata`` through the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- manifest -------------------------------------------------------------------------------------------

def step_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def file_digest(path: Path, sync: bool = False) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file (``sync``: also flush it to disk)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(step_dir: Path) -> dict:
    """The parsed ``manifest.json``; ``CheckpointError`` naming it when missing or unreadable."""
    path = Path(step_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "size" in v and "sha256" in v
                                                  for v in files.values()):
            raise ValueError("bad 'files' entry")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete structorch checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    return manifest


def check_files(step_dir: Path, manifest: dict, names: Iterable[str]) -> list[str]:
    """Problems of the named manifest entries (missing, wrong size, wrong checksum), one line each."""
    problems = []
    for rel in names:
        want = manifest["files"][rel]
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (bytes changed)")
    return problems


def verify(step_dir: Path) -> list[str]:
    """Every problem of one step directory, checked by all ranks together (each hashes a share of the files);
    the same list on every rank. Empty: intact."""
    step_dir = Path(step_dir)
    rank, world = _rank(), _world()
    try:
        manifest = read_manifest(step_dir)
        mine = sorted(manifest["files"])[rank::world]
        problems = check_files(step_dir, manifest, mine)
        for name in (META, ".metadata"):
            if name not in manifest["files"]:
                problems.append(f"{step_dir / name}: not listed in the manifest")
        if not problems:
            read_meta(step_dir)
            read_dcp_metadata(step_dir)
    except CheckpointError as e:
        problems = [str(e)]
    return sorted(set(p for part in _all_gather(problems) for p in part))


# -- meta -------------------------------------------------------------------------------------------------

def read_meta(step_dir: Path) -> dict:
    """``meta.json`` of a step directory; ``CheckpointError`` naming the file if it is missing or unreadable."""
    path = Path(step_dir) / META
    try:
        meta = json.loads(path.read_text())
        int(meta["step"]), int(meta["consumed_samples"]), dict(meta["config"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {step_dir} is not a complete checkpoint step directory") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return meta


def check_model_config(meta: dict, model_config: dict, path: Path) -> None:
    """Refuse a checkpoint written for another model shape, listing every differing field."""
    diffs = config_diff(meta["config"]["model"], model_config, "model")
    if diffs:
        raise CheckpointError(f"{path} was written for a different model:\n  " + "\n  ".join(diffs))


def config_diff(saved, current, prefix: str) -> list[str]:
    """``prefix.key: checkpoint has A, config has B`` for every differing leaf of two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += config_diff(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if saved == current else [f"{prefix}: checkpoint has {saved!r}, config has {current!r}"]


# -- collectives (no-ops on one process) ---------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _warn(message: str) -> None:
    if _rank() == 0:
        print(f"warning: {message}", file=sys.stderr)


# -- the checkpointer ---------------------------------------------------------------------------------------

def step_dirs(root: Path) -> list[Path]:
    """Step directories under ``root`` (renamed into place, so complete unless damaged later), oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and STEP_RE.match(p.name))


def resolve_step_dir(path: str | Path) -> Path:
    """A step directory from itself or from a checkpoints root (its ``latest`` marker, else its newest step)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if STEP_RE.match(path.name) or (path / MANIFEST).exists() or (path / META).exists():
        return path
    marker = path / LATEST
    if marker.is_file():
        named = path / marker.read_text().strip()
        if STEP_RE.match(named.name) and named.is_dir():
            return named
    steps = step_dirs(path)
    if not steps:
        raise CheckpointError(f"{path}: neither a step directory nor a checkpoints root holding step_* directories")
    return steps[-1]


def load_verified(path: str | Path) -> tuple[Path, dict]:
    """Resolve and verify a checkpoint named explicitly; ``CheckpointError`` naming the damaged file(s)."""
    step_dir = resolve_step_dir(path)
    problems = verify(step_dir)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} is damaged:\n  " + "\n  ".join(problems))
    return step_dir, read_meta(step_dir)


class Checkpointer:
    """Saves and restores a dict of stateful parts under one checkpoints root (collective when distributed)."""

    def __init__(self, root: Path, keep: int = 0):
        self.root, self.keep = Path(root), keep

    def latest_intact(self) -> tuple[Path, dict] | None:
        """The newest step directory that verifies, with its meta; damaged newer ones are reported and
        skipped. None when there is no checkpoint; ``CheckpointError`` when every one is damaged."""
        damaged = []
        for step_dir in reversed(step_dirs(self.root)):
            problems = verify(step_dir)
            if not problems:
                meta = read_meta(step_dir)
                if damaged:
                    _warn(f"resuming from {step_dir.name}, the newest intact checkpoint")
                return step_dir, meta
            damaged.append(step_dir)
            _warn(f"checkpoint {step_dir} is damaged and skipped:\n  " + "\n  ".join(problems))
        if damaged:
            raise CheckpointError(f"every checkpoint under {self.root} is damaged (see above); move them away "
                                  "to start afresh, or pass --resume with an intact step directory")
        return None

    def save(self, step: int, parts: dict[str, Stateful], meta: dict, files: dict[str, str | bytes]) -> Path:
        """Write ``step_XXXXXX`` atomically: DCP for the shared parts, safetensors per rank for ``per_rank``
        parts, ``meta`` to meta.json and ``files`` beside it (rank 0), then the manifest, then the rename."""
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}"
        rank = _rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "per_rank").mkdir(parents=True)
        _barrier()
        shared = {k: v for k, v in parts.items() if not getattr(v, "per_rank", False)}
        dcp.save(shared, checkpoint_id=str(tmp))
        local = {f"{name}/{k}": t.contiguous() for name, part in parts.items() if getattr(part, "per_rank", False)
                 for k, t in part.state_dict().items()}
        if local:
            save_file(local, str(tmp / "per_rank" / f"rank_{rank:05d}.safetensors"))
        if rank == 0:
            for name, content in files.items():
                with open(tmp / name, "wb" if isinstance(content, bytes) else "w") as f:
                    f.write(content)
            (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, **meta}, indent=1))
        _barrier()
        names = _files(tmp)
        digests = {rel: file_digest(tmp / rel, sync=True) for rel in names[rank::_world()]}
        gathered = _all_gather(digests)
        if rank == 0:
            manifest = {"format": FORMAT, "step": step, "algorithm": "sha256",
                        "files": {k: v for part in gathered for k, v in sorted(part.items())}}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (after a resume, or over a damaged one): swap the old one out
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
            for old in step_dirs(self.root)[: -self.keep]:
                shutil.rmtree(old)
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".old-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(step_dir: Path, parts: dict[str, Stateful]) -> None:
        """Fill ``parts`` from a verified step directory (DCP for shared parts; this rank's file for per-rank
        parts, skipped where the saving run had fewer ranks)."""
        shared = {k: v for k, v in parts.items() if not getattr(v, "per_rank", False)}
        try:
            dcp.load(shared, storage_reader=SafeFileSystemReader(str(step_dir)))
        except CheckpointError:
            raise
        except Exception as e:  # a checkpoint that verifies but lacks what this run asks for
            raise CheckpointError(f"{step_dir}: cannot load {sorted(shared)}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
        per_rank = {k: v for k, v in parts.items() if getattr(v, "per_rank", False)}
        path = step_dir / "per_rank" / f"rank_{_rank():05d}.safetensors"
        if per_rank and path.is_file():
            flat = load_file(str(path))
            for name, part in per_rank.items():
                prefix = f"{name}/"
                part.load_state_dict({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)})


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Our plain GPT (fp32, eval mode) from a verified checkpoint, with no training setup: returns
    ``(model, config, step_dir)``."""
    from model.gpt import GPT
    from pretrain.config import checkpoint_config
    from pretrain.sparsity import dense_first, enable_pruning, guides_done

    step_dir, meta = load_verified(path)
    cfg = checkpoint_config(meta["config"])
    step = int(meta["step"])
    with torch.device("meta"):  # dense_to_structured projections are still dense before their conversion
        model = GPT(dense_first(cfg.model, cfg.sparsity.rules, cfg.train.steps, step))
    model.to_empty(device=device)
    model.init_weights(0)  # also rebuilds the non-persistent RoPE tables; every weight is then loaded
    layers = model.structured_layers()
    enable_pruning(layers, cfg.sparsity.rules)  # the masks (and live self-guided paths) the run trained under
    for name in guides_done(layers, cfg.sparsity.rules, cfg.train.steps, step):
        layers[name].free_guide()
    Checkpointer.load(step_dir, {"model": ModelState(model.state_dict(keep_vars=True), {}, GlobalView(None))})
    return model.eval(), cfg, step_dir
