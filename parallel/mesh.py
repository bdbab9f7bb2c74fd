"""The (pp, dp, tp) DeviceMesh and the checks that a topology fits the world and the model."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.config import ModelConfig


class TopologyError(ValueError):
    """A parallel topology that does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data, tensor and pipeline parallelism (TorchTitan's ParallelDims)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    virtual_stages: int = 1

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
        for field, value, by, degree in checks:
            if value % degree:
                hint = (f"; pad it with model.vocab_size={-(-value // degree) * degree}" if field == "model.vocab_size"
                        else "")
                raise TopologyError(f"{field}={value} does not divide by {by}={degree}{hint}")
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


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """A 3-D mesh named (pp, dp, tp), tp innermost; None for a single process."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims.check_world(world)
    if world == 1:
        return None
    return init_device_mesh(device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
