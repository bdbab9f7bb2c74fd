"""Megatron's conjugate tensor-parallel operators on an explicit process group.

``copy`` (identity / all-reduce backward), ``reduce`` (all-reduce / identity), ``scatter`` (slice of the last
dim / all-gather) and ``gather`` (all-gather / slice), plus ``all_to_all`` (chunk i of dim 0 goes to rank i,
in both directions). megatron-core has the same four in
``tensor_parallel.mappings``, but its gather allocates on ``torch.cuda.current_device()`` (no CPU) and its
all-reduce runs on ``input.contiguous()`` and returns the input, which silently drops the reduction of a
non-contiguous gradient; these versions make every buffer contiguous and run on gloo and NCCL alike.
"""

from collections import Counter, deque

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_reduce(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    out = t.contiguous().clone()
    comm.count(out, "all_reduce")
    dist.all_reduce(out, group=comm.group)
    return out


def _all_gather(t: torch.Tensor, comm: "GroupComm", dim: int) -> torch.Tensor:
    """The group's tensors joined along ``dim`` in rank order (one all-gather)."""
    size = comm.size
    flat = torch.empty(size * t.numel(), dtype=t.dtype, device=t.device)
    comm.count(flat, "all_gather")
    dist.all_gather_into_tensor(flat, t.contiguous().view(-1), group=comm.group)
    return flat.view(size, *t.shape).movedim(0, dim).flatten(dim, dim + 1)  # [..., size, n, ...] -> [..., size n]


def _all_gather_last(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    return _all_gather(t, comm, t.dim() - 1)


def _slice_last(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    size, rank = comm.size, comm.rank
    return t.chunk(size, dim=-1)[rank].contiguous()


def _all_to_all(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    send = t.contiguous()
    out = torch.empty_like(send)
    comm.count(send, "all_to_all")
    dist.all_to_all_single(out, send, group=comm.group)
    return out


def _gather_seq(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    """``[B, T/p, ...]`` -> ``[B, T, ...]``: the sequence shards of the group, in rank order."""
    return _all_gather(t, comm, 1)


def _reduce_scatter_seq(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    """``[B, T, ...]`` partial sums -> this rank's ``[B, T/p, ...]`` shard of their sum."""
    size = comm.size
    chunks = t.reshape(t.shape[0], size, t.shape[1] // size, *t.shape[2:]).movedim(1, 0).contiguous()
    out = torch.empty(chunks.shape[1:], dtype=t.dtype, device=t.device)
    comm.count(chunks, "reduce_scatter")
    dist.reduce_scatter_tensor(out.view(-1), chunks.view(-1), group=comm.group)
    return out


def _exchange(t: torch.Tensor, comm: "GroupComm", split: int, join: int) -> torch.Tensor:
    """Chunk ``i`` of dim ``split`` goes to rank ``i``; the received chunks are joined along dim ``join`` in rank
    order (one all-to-all)."""
    size = comm.size
    chunks = t.unflatten(split, (size, t.shape[split] // size)).movedim(split, 0)  # [p (dest), ...]
    got = _all_to_all(chunks, comm)  # [p (source), ...]
    return got.movedim(0, join).flatten(join, join + 1)


def _features_to_seq(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    """``[B, T/p, F]`` (a sequence shard) -> ``[B, T, F/p]`` (this rank's feature slice)."""
    return _exchange(t, comm, split=2, join=1)


def _seq_to_features(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    """``[B, T, F/p]`` -> ``[B, T/p, F]``: the inverse exchange of ``_features_to_seq``."""
    return _exchange(t, comm, split=1, join=2)


def ring_bytes(nbytes: int, size: int, kind: str) -> int:
    """Bytes one rank sends for a collective over ``size`` ranks whose full result is ``nbytes``:
    all-reduce ``2 (p-1)/p N`` (reduce-scatter + all-gather), all-gather ``(p-1)/p N``, reduce-scatter of an
    ``N``-byte input ``(p-1)/p N``; for an all-to-all ``nbytes`` is the rank's own buffer, of which it sends
    ``(p-1)/p``."""
    factor = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "all_to_all": 1}[kind]
    return factor * nbytes * (size - 1) // size


class CommStats:
    """Bytes sent per mesh dimension and the most recent collectives, for benchmarks and tests.

    Off by default: nothing is counted unless a benchmark or test attaches one (``ParallelModel.record_comm``,
    ``GroupComm.stats``), and the log keeps only the newest ``log_limit`` entries, so a long run never grows it.
    """

    def __init__(self, log_limit: int = 4096):
        self.bytes: Counter[str] = Counter()
        """Bytes this rank sent, by dimension (tp, dp, pp), counted for ring algorithms."""
        self.log: deque[tuple[str, int]] = deque(maxlen=log_limit)
        """(collective, elements of its full buffer) of the newest tensor-parallel collectives."""

    def add(self, dim: str, nbytes: int, entry: tuple[str, int] | None = None) -> None:
        self.bytes[dim] += nbytes
        if entry is not None:
            self.log.append(entry)


def _same(t: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
    return t


class _Conjugate(torch.autograd.Function):
    """A collective ``forward`` whose gradient is the conjugate collective ``backward`` (both ``(t, comm)``)."""

    @staticmethod
    def forward(ctx, t, comm, forward, backward):
        ctx.comm, ctx.backward = comm, backward
        return forward(t, comm)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad, ctx.comm), None, None, None


class GroupComm:
    """The ``TensorParallelComm`` of ``model/structured`` over one process group."""

    def __init__(self, group: ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.stats: CommStats | None = None
        """Where collectives are counted (``tp``), when a benchmark or test attaches one; None: not counted."""

    def count(self, t: torch.Tensor, kind: str) -> None:
        if self.stats is not None:
            self.stats.add("tp", ring_bytes(t.numel() * t.element_size(), self.size, kind), (kind, t.numel()))

    def __deepcopy__(self, memo):  # a communicator is shared, never copied (pipeline stages copy the model)
        return self

    def _apply(self, t: torch.Tensor, forward, backward) -> torch.Tensor:
        return _Conjugate.apply(t, self, forward, backward) if self.size > 1 else t

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _same, _all_reduce)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _all_reduce, _same)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _slice_last, _all_gather_last)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _all_gather_last, _slice_last)

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        # the exchange permutes the ranks' chunks, so its adjoint is the same exchange
        return self._apply(t, _all_to_all, _all_to_all)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group (no autograd), e.g. for partial gradients."""
        if self.size > 1:
            self.count(t, "all_reduce")
            dist.all_reduce(t, group=self.group)
        return t

    def all_reduce_max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place max over the group (no autograd)."""
        if self.size > 1:
            self.count(t, "all_reduce")
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t


class SequenceParallelComm(GroupComm):
    """Megatron's sequence-parallel operators, behind the same interface: the tensors a tensor-parallel region
    takes and returns are split along the sequence (dim 1 of ``[B, T, ...]``) over the group.

    A region's entry gathers the sequence instead of copying (``copy``: all-gather forward, reduce-scatter
    backward; ``scatter``: one all-to-all from sequence shards to feature slices) and its exit scatters it
    instead of all-reducing (``reduce``: reduce-scatter forward, all-gather backward; ``gather``: the inverse
    all-to-all). An all-gather plus a reduce-scatter move what one all-reduce moves, so the traffic is
    unchanged while the norms and the residual stream hold ``1/tp`` of the sequence. Every structure's shard
    keeps its own communication points; a replicated parameter applied outside the region (before a column
    shard's entry, after a row shard's exit) now sees only this rank's tokens, so its gradient is a partial
    sum (``parallel/tensor.py`` all-reduces it).
    """

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _gather_seq, _reduce_scatter_seq)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _reduce_scatter_seq, _gather_seq)

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _features_to_seq, _seq_to_features)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t, _seq_to_features, _features_to_seq)
