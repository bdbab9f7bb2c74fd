"""``ParallelDims``: the degrees, the (pp, dp, tp) DeviceMesh, its process groups and this rank's coordinates,
and the checks that a topology fits the world and the model (TorchTitan's ``parallel_dims.py``)."""

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.config import ModelConfig


class TopologyError(ValueError):
    """A parallel topology that does not fit the world size or the model."""


DIMS = ("pp", "dp", "tp")
"""Mesh dimensions, outermost first (tp innermost, so tensor-parallel peers are neighbours)."""


@dataclass
class ParallelDims:
    """Degrees of data, tensor and pipeline parallelism, and once ``build_mesh`` ran, the mesh and its groups.

    ``group(name)`` is None and ``rank(name)`` is 0 for a dimension of degree 1 (nothing to communicate), so
    callers never test for a missing group themselves.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    virtual_stages: int = 1
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False, compare=False)
    """The (pp, dp, tp) mesh; None for one process."""

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Check the degrees against the job's world size and build the mesh (None for a single process)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.check_world(world)
        if world > 1:
            self.mesh = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=DIMS)
        return self.mesh

    def degree(self, name: str) -> int:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}[name]

    def group(self, name: str) -> ProcessGroup | None:
        """The process group of mesh dimension ``name`` (pp, dp or tp), or None when its degree is 1."""
        if self.mesh is None or self.degree(name) == 1:
            return None
        return self.mesh.get_group(name)

    def rank(self, name: str) -> int:
        """This process's coordinate along mesh dimension ``name``."""
        group = self.group(name)
        return dist.get_rank(group) if group is not None else 0

    def submesh(self, name: str) -> DeviceMesh | None:
        """The 1-D mesh of dimension ``name`` through this rank (None for a single process)."""
        return self.mesh[name] if self.mesh is not None else None

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise TopologyError(f"parallel.dp x parallel.tp x parallel.pp = {self.dp} x {self.tp} x {self.pp} = "
                                f"{self.world_size}, but the job has {world_size} processes (WORLD_SIZE); "
                                f"launch {self.world_size} processes or change the degrees")

    def check_model(self, cfg: ModelConfig) -> None:
        """Everything tensor and pipeline parallelism split must divide; names the field that does not."""
        tp, stages = self.tp, self.num_stages
        checks = [("model.n_heads", cfg.n_heads, "parallel.tp", tp),
                  ("model.n_kv_heads", cfg.kv_heads, "parallel.tp", tp),
                  ("model.vocab_size", cfg.vocab_size, "parallel.tp", tp),
                  ("model.d_ff", cfg.d_ff, "parallel.tp", tp),
                  ("model.n_layers", cfg.n_layers, "parallel.pp x parallel.virtual_stages", stages)]
        for name, value, by, degree in checks:
            if value % degree:
                hint = (f"; pad it with model.vocab_size={-(-value // degree) * degree}" if name == "model.vocab_size"
                        else "")
                raise TopologyError(f"{name}={value} does not divide by {by}={degree}{hint}")
        if self.pp > 1 and cfg.tie_embeddings:
            raise TopologyError("model.tie_embeddings=true needs the embedding and the head on one stage; "
                                "it is not supported with parallel.pp > 1")


def init_distributed(device: torch.device) -> None:
    """Join the torchrun/SLURM process group (gloo on CPU, NCCL on CUDA) if the job has several processes."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
