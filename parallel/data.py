"""Data parallelism: gradients averaged over the dp group, and the global gradient norm over all dims."""

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from parallel.comm import ring_bytes

BUCKET_ELEMENTS = 1 << 22


def all_reduce_mean(grads: list[torch.Tensor], group: ProcessGroup | None, size: int) -> int:
    """Average gradients over ``group`` in flat buckets (one all-reduce per bucket and dtype); returns the
    bytes this rank sent (ring all-reduce)."""
    if group is None or size == 1 or not grads:
        return 0
    bucket: list[torch.Tensor] = []
    count = 0
    sent = 0

    def flush():
        nonlocal bucket, count
        if not bucket:
            return
        nonlocal sent
        flat = torch.cat([g.reshape(-1) for g in bucket])
        sent += ring_bytes(flat.numel() * flat.element_size(), size, "all_reduce")
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket, count = [], 0

    for g in sorted(grads, key=lambda t: t.dtype == torch.float32):  # group dtypes into buckets
        if bucket and (bucket[0].dtype != g.dtype or count + g.numel() > BUCKET_ELEMENTS):
            flush()
        bucket.append(g)
        count += g.numel()
    flush()
    return sent


def clip_global_norm(named_grads: dict[str, torch.Tensor], sharded: set[str], max_norm: float,
                     tp_group: ProcessGroup | None, pp_group: ProcessGroup | None) -> float:
    """Clip to the norm of the *global* gradient; returns that norm.

    Tensor-parallel shards contribute their squares summed over tp; replicated tensors count once;
    pipeline stages hold disjoint tensors and are summed over pp. Data-parallel replicas are identical.
    """
    ref = next(iter(named_grads.values()))
    shard_sq = torch.zeros((), dtype=torch.float64, device=ref.device)
    repl_sq = torch.zeros((), dtype=torch.float64, device=ref.device)
    for name, g in named_grads.items():
        sq = g.detach().double().pow(2).sum()
        if name in sharded:
            shard_sq += sq
        else:
            repl_sq += sq
    if tp_group is not None:
        dist.all_reduce(shard_sq, group=tp_group)
    total = shard_sq + repl_sq
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = math.sqrt(float(total))
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in named_grads.values():
            g.mul_(scale)
    return norm
