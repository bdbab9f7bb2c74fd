"""``ParallelModel``: the model as one rank runs it, on any (dp, tp, pp), with one interface.

Applies tensor parallelism, then the pipeline split, then data parallelism to the plain GPT (TorchTitan's
order). Given a ``ShardedInit``, the GPT is on ``meta`` and each rank allocates and fills only its own shards and
stages, with the values a full init from the same seed gives them, so every topology starts from the same
weights; without one, the GPT is already initialised and is sliced.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist

from model.config import SLOTS
from model.gpt import GPT
from model.structured import StructuredLinear
from parallel.blocks import apply_activation_checkpointing, compile_blocks
from parallel.comm import CommStats, GroupComm, SequenceParallelComm
from parallel.data import clip_global_norm, reduce_to_owners
from parallel.init import ShardedInit
from parallel.mesh import ParallelDims
from parallel.pipeline import Pipeline, split_stage, stage_ids
from parallel.tensor import apply_tp, partial_grads


class ParallelModel:
    """This rank's part of the model, its process groups and the train/eval steps.

    ``placements`` maps every parameter and persistent buffer to the dimension split over tensor-parallel
    ranks (None: replicated); the checkpoint reads it to give each local tensor its global view.
    """

    def __init__(self, model: GPT, dims: ParallelDims, device: torch.device, micro_batch: int = 1,
                 local_batch: int = 1, schedule: str = "1f1b", activation_checkpointing: str = "none",
                 compile: bool | str = False, sequence_parallel: bool = False, init: ShardedInit | None = None):
        self.dims, self.device = dims, device
        self.micro_batch, self.local_batch = micro_batch, local_batch
        self.tp_group, self.dp_group, self.pp_group = dims.group("tp"), dims.group("dp"), dims.group("pp")
        self.tp_rank, self.dp_rank, self.pp_rank = dims.rank("tp"), dims.rank("dp"), dims.rank("pp")

        self.placements = {name: None for name, _ in model.named_parameters()}
        self.placements.update({name: None for name, _ in model.named_buffers()})
        self.partial: set[str] = set()
        self.sequence_parallel = sequence_parallel and self.tp_group is not None
        comm_class = SequenceParallelComm if self.sequence_parallel else GroupComm
        self.tp_comm = comm_class(self.tp_group) if self.tp_group is not None else None
        self.comm_stats: CommStats | None = None
        """Bytes sent over dp, pp and tp, when a benchmark attached a ``CommStats`` (``record_comm``)."""
        if self.tp_comm is not None:
            placements, self.partial = apply_tp(model, self.tp_comm)
            self.placements.update(placements)
        ids = stage_ids(self.pp_rank, dims.pp, dims.virtual_stages) if dims.pp > 1 else [0]
        self.stages = {s: split_stage(model, s, dims.num_stages) if dims.pp > 1 else model for s in ids}
        if init is not None:  # a meta model: allocate this rank's stages only and fill them shard by shard
            for stage in self.stages.values():
                stage.to_empty(device=device)
            init(self.stages, self.tp_comm)
        else:
            self.stages = {s: stage.to(device) for s, stage in self.stages.items()}
        if dims.pp > 1:
            self.pipeline: Pipeline | None = Pipeline(self.stages, dims.num_stages, self.pp_rank, dims.pp,
                                                      self.pp_group, schedule, local_batch // micro_batch, device,
                                                      dims.tp if self.sequence_parallel else 1)
        else:
            self.pipeline = None
        for stage in self.stages.values():
            apply_activation_checkpointing(stage, activation_checkpointing)
            if compile:  # True: inductor, or a backend's name
                compile_blocks(stage, "inductor" if compile is True else compile)
        self._params = dict(self.named_parameters())

    def record_comm(self, stats: CommStats) -> None:
        """Count this rank's communication into ``stats`` from now on (benchmarks; off by default)."""
        self.comm_stats = stats
        if self.tp_comm is not None:
            self.tp_comm.stats = stats

    # -- parameters -------------------------------------------------------------------------------------
    def named_parameters(self):
        seen = set()
        for module in self.stages.values():
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def refresh_parameters(self) -> None:
        """Take the stages' parameters anew (after a layer dropped one, e.g. a freed self-guided path)."""
        self._params = dict(self.named_parameters())

    def restructure(self, name: str, build: Callable[[torch.Tensor], StructuredLinear]) -> StructuredLinear:
        """Replace projection ``name`` (held by this rank) by ``build(W)``, ``W`` its full ``[out, in]`` matrix
        (gathered over tensor-parallel ranks, so every rank builds the same layer), sharded like the old one.
        Collective over tp. Returns the full new layer (it carries ``projection_error``)."""
        stage = next(m for m in self.stages.values() if name in m.structured_layers())
        parent_name, slot = name.rsplit(".", 1)
        parent = stage.get_submodule(parent_name)
        style = SLOTS[slot].style
        w = getattr(parent, slot).to_dense().detach().contiguous()
        if self.tp_comm is not None:
            parts = [torch.empty_like(w) for _ in range(self.dims.tp)]
            dist.all_gather(parts, w, group=self.tp_group)
            w = torch.cat(parts, 0 if style == "column" else 1)
        full = build(w)
        for key in [k for k in self.placements if k.startswith(f"{name}.")]:
            del self.placements[key]
        self.partial = {k for k in self.partial if not k.startswith(f"{name}.")}
        layer = full
        if self.tp_comm is not None:
            shard = full.shard_all(self.tp_comm.rank, self.tp_comm.size, style, self.tp_comm)
            layer = shard.layer
            self.placements.update({f"{name}.{k}": v for k, v in shard.placements.items()})
            self.partial.update(f"{name}.{k}" for k in partial_grads(shard, self.tp_comm))
        for key, _ in [*layer.named_parameters(), *layer.named_buffers()]:
            self.placements.setdefault(f"{name}.{key}", None)
        setattr(parent, slot, layer.to(self.device))
        self._params = dict(self.named_parameters())
        return full

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of this rank's stages, by global name."""
        out = {}
        for module in self.stages.values():
            out.update(module.state_dict(keep_vars=True))
        return out

    def structured_layers(self) -> dict[str, StructuredLinear]:
        """This rank's structured projections (its shards) by qualified name."""
        return {name: m for stage in self.stages.values() for name, m in stage.structured_layers().items()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = [g for m in self.stages.values() for g in m.param_groups(weight_decay)]
        merged: dict[str, dict] = {}
        for g in groups:  # one group per role across stages
            merged.setdefault(g["role"], {**g, "params": []})["params"].extend(g["params"])
        return list(merged.values())

    def train(self, mode: bool = True) -> None:
        for m in self.stages.values():
            m.train(mode)

    # -- steps ------------------------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor | None:
        """Gradients of the mean loss over this rank's ``local_batch`` sequences; returns that loss where
        this rank computes it (the last pipeline stage), else None."""
        x, y = x.to(self.device), y.to(self.device)
        if self.pipeline is not None:
            if self.comm_stats is not None:
                self.comm_stats.add("pp", self.pipeline.p2p_bytes(*x.shape))
            with autocast:
                return self.pipeline.train_step(x, y)
        model = self.stages[0]
        steps = self.local_batch // self.micro_batch
        total = torch.zeros((), device=self.device)
        for i in range(steps):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            with autocast:
                loss = model(x[sl], y[sl])
            (loss / steps).backward()
            total += loss.detach()
        return total / steps

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor | None:
        x, y = x.to(self.device), y.to(self.device)
        self.train(False)
        try:
            with autocast:
                if self.pipeline is not None:
                    return self.pipeline.eval_loss(x, y)
                return self.stages[0](x, y)
        finally:
            self.train(True)

    def reduce_and_clip(self, max_norm: float, owners: dict[str, int]) -> float:
        """Sum partial tensor-parallel gradients, average each gradient onto its owner in the dp group
        (``owners``: parameter name -> dp rank, the block-wise optimizer's), drop the others (``grad =
        None``), and clip to the global norm, which sums the owned parts."""
        grads = {n: p.grad for n, p in self._params.items() if p.grad is not None}
        if self.tp_group is not None:
            for name in sorted(self.partial):  # the same order on every rank (set order is per-process)
                if name in grads:
                    self.tp_comm.all_reduce_(grads[name])
        sent = reduce_to_owners(grads, owners, self.dp_group, self.dims.dp)
        if self.comm_stats is not None:
            self.comm_stats.add("dp", sent)
        for name in [n for n in grads if owners[n] != self.dp_rank]:
            self._params[name].grad = None
            del grads[name]
        sharded = {n for n, d in self.placements.items() if d is not None}
        return clip_global_norm(grads, sharded, max_norm, self.tp_group, self.pp_group, self.dp_group)

    def global_mean(self, local: torch.Tensor | None) -> float:
        """The loss of the whole global batch, known on every rank (averaged over dp, taken from the last
        pipeline stage and tensor-parallel rank 0)."""
        if not dist.is_initialized():
            return float(local)
        last = self.pipeline is None or self.pipeline.has_last
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        if last and self.tp_rank == 0 and local is not None:
            value += float(local) / self.dims.dp
        dist.all_reduce(value)
        return float(value)
