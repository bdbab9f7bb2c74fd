"""Pipeline parallelism: contiguous blocks per stage, run by torch.distributed.pipelining schedules.

A stage is the (tensor-parallel) GPT with the blocks of other stages deleted; the first stage keeps the
embedding, the last the final norm, the head and the loss, so parameter names stay global. With
``virtual_stages = v`` a rank owns stages ``pp_rank + k * pp`` (the looped layout of interleaved schedules).
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from model.gpt import GPT

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}
MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """Global stage indices owned by ``pp_rank``."""
    return [pp_rank + k * pp for k in range(virtual)]


def stage_owner(stage: int, pp: int) -> int:
    return stage % pp


def split_stage(model: GPT, stage: int, num_stages: int) -> GPT:
    """A copy of ``model`` holding only the blocks (and ends) of ``stage``."""
    n = model.cfg.n_layers
    per = n // num_stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    part = copy.deepcopy(model)
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm, part.output = None, None
    return part


class Pipeline:
    """This rank's stages and the schedule that trains them."""

    def __init__(self, stages: dict[int, GPT], num_stages: int, pp_rank: int, pp: int, group: ProcessGroup,
                 schedule: str, n_microbatches: int, device: torch.device, seq_shards: int = 1):
        self.stages, self.num_stages, self.pp_rank, self.pp, self.group = stages, num_stages, pp_rank, pp, group
        self.device = device
        self.seq_shards = seq_shards
        """Sequence parallelism splits the hidden states sent between stages along the sequence this many ways."""
        # Every rank passes the loss function: the schedule runs backward only where it has one.
        loss_fn = next(iter(stages.values())).loss_fn
        pipeline_stages = [PipelineStage(m, idx, num_stages, device, group=group) for idx, m in stages.items()]
        cls = SCHEDULES[schedule]
        if schedule in MULTI_STAGE:
            self.schedule = cls(pipeline_stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        else:
            self.schedule = cls(pipeline_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)

    def p2p_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes this rank sends per step: activations forward from each owned non-last stage and their
        gradients backward from each owned non-first stage (fp32 ``[batch, T, d]`` in micro-batches)."""
        cfg = next(iter(self.stages.values())).cfg
        per_stage = batch * (seq_len // self.seq_shards) * cfg.d_model * 4
        sends = sum((s != self.num_stages - 1) + (s != 0) for s in self.stages)
        return sends * per_stage

    @property
    def has_first(self) -> bool:
        return 0 in self.stages

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stages

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one batch in micro-batches; the mean loss on the last stage, else None."""
        losses: list[torch.Tensor] = []
        kwargs = {"target": y, "losses": losses} if self.has_last else {}
        args = (x,) if self.has_first else ()
        self.schedule.step(*args, **kwargs)
        return torch.stack([loss.detach() for loss in losses]).mean() if self.has_last else None

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Forward only, stage by stage with point-to-point sends; the loss on the last stage, else None."""
        h: torch.Tensor | None = None
        shape = (x.shape[0], x.shape[1] // self.seq_shards, next(iter(self.stages.values())).cfg.d_model)
        loss = None
        for s in range(self.num_stages):
            if s not in self.stages:
                continue
            prev = stage_owner(s - 1, self.pp) if s > 0 else None
            if s > 0 and prev != self.pp_rank:
                h = torch.empty(shape, dtype=torch.float32, device=self.device)
                dist.recv(h, src=dist.get_global_rank(self.group, prev), group=self.group)
            out = self.stages[s](x if s == 0 else h)
            if s == self.num_stages - 1:
                loss = self.stages[s].loss_fn(out, y)
            else:
                h = out.float().contiguous()
                nxt = stage_owner(s + 1, self.pp)
                if nxt != self.pp_rank:
                    dist.send(h, dst=dist.get_global_rank(self.group, nxt), group=self.group)
        return loss
