"""Data parallelism: gradients averaged onto their owners in the dp group, and the global gradient norm over all
dims."""

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from parallel.comm import ring_bytes

BUCKET_ELEMENTS = 1 << 22


def buckets(tensors: Iterable[torch.Tensor], limit: int = BUCKET_ELEMENTS) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors of at most ``limit`` elements (one tensor may exceed it)."""
    run: list[torch.Tensor] = []
    count = 0
    for t in tensors:
        if run and (run[0].dtype != t.dtype or count + t.numel() > limit):
            yield run
            run, count = [], 0
        run.append(t)
        count += t.numel()
    if run:
        yield run


def flat_apply(tensors: list[torch.Tensor], fn: Callable[[torch.Tensor], None]) -> int:
    """Run the in-place collective ``fn`` on one flat copy of ``tensors``, copy the result back; returns the
    flat buffer's bytes."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    fn(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat.numel() * flat.element_size()


def owner_buckets(tensors: dict[str, torch.Tensor], owners: dict[str, int],
                  size: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """``(owner dp rank, bucket)`` over every owner's tensors, in one order on every rank (names sorted,
    dtypes grouped into buckets)."""
    for owner in range(size):
        mine = [tensors[n] for n in sorted(tensors) if owners[n] == owner]
        for run in buckets(sorted(mine, key=lambda t: t.dtype == torch.float32)):
            yield owner, run


def reduce_to_owners(grads: dict[str, torch.Tensor], owners: dict[str, int], group: ProcessGroup | None,
                     size: int) -> int:
    """Average each gradient onto its owner's dp rank only (bucketed ``reduce``, ZeRO's reduce-scatter at
    block granularity). The other ranks' copies are left partly reduced: only owners may use them. Returns
    the bytes this rank sent, counted like a ring reduce-scatter ((p-1)/p of the data)."""
    if group is None or size == 1:
        return 0
    sent = 0
    for owner, run in owner_buckets(grads, owners, size):
        dst = dist.get_global_rank(group, owner)

        def mean(flat, dst=dst):
            dist.reduce(flat, dst=dst, group=group)
            flat.div_(size)

        sent += ring_bytes(flat_apply(run, mean), size, "all_gather")
    return sent


def mesh_sum(sharded: torch.Tensor, replicated: torch.Tensor, tp_group: ProcessGroup | None,
             pp_group: ProcessGroup | None = None, dp_group: ProcessGroup | None = None) -> torch.Tensor:
    """The sum over the mesh of per-rank partial sums (scalars or vectors, e.g. squared norms or dot products):
    the part from tensor-parallel shards is summed over tp, the part from replicated tensors counts once, and
    the total is summed over ``pp_group`` (stages hold disjoint tensors) and ``dp_group`` (when each dp rank
    holds the part it owns) where given. Collective over the groups given; in place on ``sharded``."""
    if tp_group is not None:
        dist.all_reduce(sharded, group=tp_group)
    total = sharded.add_(replicated)
    for group in (pp_group, dp_group):
        if group is not None:
            dist.all_reduce(total, group=group)
    return total


def global_norm(named: dict[str, torch.Tensor], sharded: set[str], tp_group: ProcessGroup | None,
                pp_group: ProcessGroup | None, dp_group: ProcessGroup | None = None,
                device: torch.device | None = None) -> float:
    """The norm of the *global* tensor that ``named`` are this rank's parts of: tensor-parallel shards
    (``sharded`` names) contribute their squares summed over tp; replicated tensors count once; pipeline stages
    hold disjoint tensors and are summed over pp; with ``dp_group``, each dp rank passes only the tensors it owns
    and they are summed. Collective over the groups given, on ``device`` (default: the tensors'; a rank passing
    none still joins)."""
    ref = next(iter(named.values()), None)
    device = device or (None if ref is None else ref.device)
    shard_sq = torch.zeros((), dtype=torch.float64, device=device)
    repl_sq = torch.zeros_like(shard_sq)
    for name, t in named.items():
        sq = t.detach().double().pow(2).sum()
        if name in sharded:
            shard_sq += sq
        else:
            repl_sq += sq
    return math.sqrt(float(mesh_sum(shard_sq, repl_sq, tp_group, pp_group, dp_group)))


def clip_global_norm(named_grads: dict[str, torch.Tensor], sharded: set[str], max_norm: float,
                     tp_group: ProcessGroup | None, pp_group: ProcessGroup | None,
                     dp_group: ProcessGroup | None = None) -> float:
    """Clip to the norm of the *global* gradient (``global_norm``); returns that norm. Data-parallel replicas
    are identical, unless ``dp_group`` is given: then each dp rank passes only the gradients it owns."""
    norm = global_norm(named_grads, sharded, tp_group, pp_group, dp_group)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in named_grads.values():
            g.mul_(scale)
    return norm
