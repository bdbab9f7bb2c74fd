"""Megatron's conjugate tensor-parallel operators on an explicit process group.

``copy`` (identity / all-reduce backward), ``reduce`` (all-reduce / identity), ``scatter`` (slice of the last
dim / all-gather) and ``gather`` (all-gather / slice). megatron-core has the same four in
``tensor_parallel.mappings``, but its gather allocates on ``torch.cuda.current_device()`` (no CPU) and its
all-reduce runs on ``input.contiguous()`` and returns the input, which silently drops the reduction of a
non-contiguous gradient; these versions make every buffer contiguous and run on gloo and NCCL alike.
"""

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_reduce(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    out = t.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _all_gather_last(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    flat = torch.empty(size * t.numel(), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(flat, t.contiguous().view(-1), group=group)
    parts = flat.view(size, *t.shape).movedim(0, -2)  # [..., size, n]
    return parts.reshape(*t.shape[:-1], size * t.shape[-1])


def _slice_last(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return t.chunk(size, dim=-1)[rank].contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        return _all_reduce(t, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _slice_last(t, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _all_gather_last(t, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice_last(grad, ctx.group), None


class GroupComm:
    """The ``TensorParallelComm`` of ``model/structured`` over one process group."""

    def __init__(self, group: ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def __deepcopy__(self, memo):  # a communicator is shared, never copied (pipeline stages copy the model)
        return self

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return _Copy.apply(t, self.group) if self.size > 1 else t

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return _Reduce.apply(t, self.group) if self.size > 1 else t

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        return _Scatter.apply(t, self.group) if self.size > 1 else t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(t, self.group) if self.size > 1 else t

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group (no autograd), e.g. for partial gradients."""
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t
