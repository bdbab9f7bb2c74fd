"""Tensor parallelism over the plain GPT: every projection is replaced by its structure's own shard.

Each projection splits as its slot says (``model.config.SLOTS``: q/k/v and MLP gate/up column-parallel, o and
down row-parallel; heads split across ranks); the token
embedding and the head are vocab-parallel and the loss is a vocab-parallel cross-entropy. Parameter
names do not change, and every parameter's split dimension is recorded for checkpoints.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SLOTS
from model.gpt import GPT
from model.structured.base import LayerShard
from parallel.comm import GroupComm, SequenceParallelComm


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + n)`` of the embedding; out-of-range ids contribute zero, then all-reduce."""

    def __init__(self, weight: torch.Tensor, start: int, comm: GroupComm):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [B, T, d]
        return self.comm.reduce(out.masked_fill(outside[..., None], 0.0))


class VocabParallelHead(nn.Module):
    """Column-parallel output head: this rank's slice of the vocabulary logits."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, comm: GroupComm):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.comm = comm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.comm.copy(h), self.weight)  # [B, T, V/tp]


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits (max, sum-exp and target logit all-reduced)."""

    @staticmethod
    def forward(ctx, logits, targets, start, comm):
        logits = logits.float()
        peak = comm.all_reduce_max_(logits.max(dim=-1).values)
        shifted = logits - peak[..., None]
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        comm.all_reduce_(total)
        local = targets - start
        inside = (local >= 0) & (local < logits.shape[-1])
        picked = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1)[..., None])[..., 0] * inside
        comm.all_reduce_(picked)
        ctx.save_for_backward(exp, total, local, inside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        exp, total, local, inside = ctx.saved_tensors
        g = exp / total[..., None]
        g.scatter_add_(-1, local.clamp(0, g.shape[-1] - 1)[..., None], -inside[..., None].to(g.dtype))
        return g * grad[..., None], None, None, None


def vocab_parallel_cross_entropy(comm: GroupComm, start: int):
    """A ``loss_fn(logits, targets)`` for vocab-sharded logits: the mean token cross-entropy."""

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _VocabParallelCE.apply(logits, targets, start, comm).mean()

    return loss_fn


def partial_grads(shard: LayerShard, comm: GroupComm) -> set[str]:
    """Parameters of ``shard`` whose gradients are partial sums over the tensor-parallel group: the ones it
    names, and under sequence parallelism every replicated parameter (applied outside the region, to this
    rank's tokens only)."""
    names = set(shard.partial_grads)
    if isinstance(comm, SequenceParallelComm):
        params = {n for n, _ in shard.layer.named_parameters()}
        names |= {n for n, d in shard.placements.items() if d is None and n in params}
    return names


def apply_tp(model: GPT, comm: GroupComm) -> tuple[dict[str, int | None], set[str]]:
    """Shard ``model`` in place for rank ``comm.rank`` of ``comm.size`` (sequence-parallel when ``comm`` is a
    ``SequenceParallelComm``).

    Returns the split dimension of every parameter and persistent buffer by name (None: replicated) and the
    names of replicated parameters whose gradients must be summed over the tensor-parallel group.
    """
    placements: dict[str, int | None] = {}
    partial: set[str] = set()
    rank, size = comm.rank, comm.size
    for i, block in model.layers.items():
        for name, parent, layer in list(block.projections()):
            slot = SLOTS[name]
            prefix = f"layers.{i}.{slot.group}.{name}"
            shard = layer.shard_all(rank, size, slot.style, comm)
            setattr(parent, name, shard.layer)
            placements.update({f"{prefix}.{k}": v for k, v in shard.placements.items()})
            partial.update(f"{prefix}.{k}" for k in partial_grads(shard, comm))
    vocab = model.cfg.vocab_size
    start = rank * (vocab // size)
    if model.tok_embeddings is not None:
        emb = model.tok_embeddings.weight.detach().chunk(size, 0)[rank].clone()
        model.tok_embeddings = VocabParallelEmbedding(emb, start, comm)
        placements["tok_embeddings.weight"] = 0
    if model.output is not None:
        if model.cfg.tie_embeddings and model.tok_embeddings is not None:
            model.output = VocabParallelHead(model.tok_embeddings.weight, comm)
        else:
            model.output = VocabParallelHead(model.output.weight.detach().chunk(size, 0)[rank].clone(), comm)
            placements["output.weight"] = 0
        model.loss_fn = vocab_parallel_cross_entropy(comm, start)
    for name, _ in model.named_parameters():
        placements.setdefault(name, None)  # norms: replicated
    if isinstance(comm, SequenceParallelComm):  # the norms run on this rank's tokens
        partial.update(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.RMSNorm))
    return placements, partial
