"""Block-wise distributed optimizers: ZeRO-1 at the granularity of blocks.

A *block* is one parameter tensor as this rank holds it (a whole tensor, or its tensor-parallel shard), or a
group of them when the optimizer's ``block_key`` maps several names to one key (mL-BFGS's layer and stage
blocks). Each block has exactly one owner in the data-parallel group, chosen by a greedy size balance that
every rank computes identically. The owner alone receives the block's averaged gradient (a bucketed ``reduce``, see
``parallel.data.reduce_to_owners``), keeps its optimizer state and computes its update; the updated blocks
then reach every dp rank by bucketed broadcasts. With dp = 1 every block is local and this is an ordinary
optimizer.

Subclasses implement ``init_state`` (allocated eagerly, so checkpoints can be loaded into it before the first
step) and ``direction`` (the step ``d`` in ``p <- p (1 - lr wd) - lr d``), or ``directions`` and ``apply`` when
the blocks' directions depend on each other (a global normalisation); decoupled weight decay, the LR set by
the trainer's schedule, parameter groups and the owner bookkeeping are shared. Clipping happens before
``step`` on the global gradient norm (``ParallelModel.reduce_and_clip``).

State tensors are of two kinds for checkpoints: ``elementwise`` keys have the block's shape and reshard
with the parameter across any (dp, tp, pp); ``stacked`` keys are a stack of such tensors (leading dimension
first, e.g. a curvature history) and reshard the same way; every other key is *block state* (projections),
tied to the block itself, so it reshards across dp and pp but a tensor-parallel shard's block state only
loads at the same tp degree.
"""

import abc
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from parallel.comm import CommStats, ring_bytes
from parallel.data import flat_apply, owner_buckets


def assign_owners(sizes: dict[str, int], ranks: int) -> dict[str, int]:
    """Owner rank of each block: largest first (name breaks ties) to the least-loaded rank (LPT greedy)."""
    load = [0] * ranks
    owners = {}
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += sizes[name]
    return owners


def ownership_report(sizes: dict[str, int], owners: dict[str, int], ranks: int) -> dict:
    """Elements per rank and the imbalance ``max / mean`` (1.0 is perfect)."""
    load = [0] * ranks
    for name, r in owners.items():
        load[r] += sizes[name]
    mean = sum(load) / ranks
    return {"elements": load, "imbalance": max(load) / mean if mean else 1.0}


class BlockOptimizer(torch.optim.Optimizer, abc.ABC):
    """Shared machinery; see the module docstring."""

    name: ClassVar[str]
    elementwise: ClassVar[tuple[str, ...]] = ()
    stacked: ClassVar[tuple[str, ...]] = ()
    tp_reshardable: ClassVar[bool] = False
    """True when every state key is elementwise or stacked, so checkpoints load at any tensor-parallel degree."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], groups: list[dict], defaults: dict,
                 dp_group: ProcessGroup | None = None, block_key: Callable[[str], str] | None = None):
        super().__init__(groups, defaults)
        self.names = {id(p): n for n, p in named_params}
        missing = [p.shape for g in self.param_groups for p in g["params"] if id(p) not in self.names]
        if missing:
            raise ValueError(f"{len(missing)} optimizer parameters have no name (shapes {missing[:3]})")
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.sizes = {self.names[id(p)]: p.numel() for g in self.param_groups for p in g["params"]}
        self.block_key = block_key or (lambda name: name)
        """The block a parameter belongs to: all parameters of a block have one owner."""
        block_sizes: dict[str, int] = {}
        for name, size in self.sizes.items():
            block_sizes[self.block_key(name)] = block_sizes.get(self.block_key(name), 0) + size
        block_owner = assign_owners(block_sizes, self.dp_size)
        self.owners = {name: block_owner[self.block_key(name)] for name in self.sizes}
        """Owner dp rank of every parameter (its block's), by parameter name (the same on every rank)."""
        self.step_count = 0
        self.comm_stats: CommStats | None = None
        """Counts the bytes this rank sends broadcasting updated blocks (``dp``, as an all-gather) when a
        benchmark attaches one; None: not counted."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.owns(p):
                    self.state[p] = self.init_state(p, group)

    # -- what subclasses implement ----------------------------------------------------------------------
    @abc.abstractmethod
    def init_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The zero state of one owned block (allocated at construction)."""

    def direction(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """The update direction ``d`` of one owned tensor (``p`` moves by ``-lr d``)."""
        raise NotImplementedError(f"{self.name}: implement direction, or directions and apply")

    def directions(self, owned: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
        """The directions of all owned tensors with a gradient (``owned``: ``(p, group)`` in group order);
        by default each from its own ``direction``."""
        return [self.direction(p, p.grad, self.state[p], group) for p, group in owned]

    def apply(self, p: torch.Tensor, d: torch.Tensor, group: dict) -> None:
        """Move ``p`` along ``d``: decoupled weight decay, then ``p <- p - lr d``."""
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(d.to(p.dtype), alpha=-group["lr"])

    # -- ownership --------------------------------------------------------------------------------------
    def owns(self, p: torch.Tensor) -> bool:
        return self.owners[self.names[id(p)]] == self.dp_rank

    def ownership(self) -> dict:
        return ownership_report(self.sizes, self.owners, self.dp_size)

    def state_bytes(self) -> int:
        """Optimizer-state bytes this rank holds."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if torch.is_tensor(t))

    def forget(self, names: list[str]) -> None:
        """Drop the parameters ``names`` (and their state) for good; the other blocks keep their owners."""
        gone = set(names)
        for group in self.param_groups:
            kept = []
            for p in group["params"]:
                if self.names.get(id(p)) in gone:
                    self.state.pop(p, None)
                    del self.names[id(p)]
                else:
                    kept.append(p)
            group["params"] = kept
        for name in gone:
            self.sizes.pop(name, None)
            self.owners.pop(name, None)

    def adopt(self, named_params: list[tuple[str, nn.Parameter]], role: str) -> None:
        """Take new parameters into the group of ``role`` with zero state; each goes to its block's owner, or for a
        new block to the least-loaded dp rank (largest first, name breaking ties: the same on every rank)."""
        group = next(g for g in self.param_groups if g.get("role") == role)
        load = [0] * self.dp_size
        for name, owner in self.owners.items():
            load[owner] += self.sizes[name]
        block_owner = {self.block_key(n): r for n, r in self.owners.items()}
        for name, p in sorted(named_params, key=lambda np: (-np[1].numel(), np[0])):
            group["params"].append(p)
            self.names[id(p)] = name
            self.sizes[name] = p.numel()
            key = self.block_key(name)  # a block that still has tensors keeps its owner
            if key not in block_owner:
                block_owner[key] = min(range(self.dp_size), key=lambda i: (load[i], i))
            self.owners[name] = block_owner[key]
            load[self.owners[name]] += p.numel()
            if self.owns(p):
                self.state[p] = self.init_state(p, group)

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{self.name}: closures are not supported")
        self.step_count += 1
        owned = [(p, group) for group in self.param_groups for p in group["params"]
                 if p.grad is not None and self.owns(p)]
        for (p, group), d in zip(owned, self.directions(owned), strict=True):
            self.apply(p, d, group)
        self._broadcast_updates()

    def _broadcast_updates(self) -> None:
        if self.dp_size == 1:
            return
        params = {self.names[id(p)]: p.data for g in self.param_groups for p in g["params"]}
        for owner, run in owner_buckets(params, self.owners, self.dp_size):
            src = dist.get_global_rank(self.dp_group, owner)
            nbytes = flat_apply(run, lambda flat, src=src: dist.broadcast(flat, src=src, group=self.dp_group))
            if self.comm_stats is not None:
                self.comm_stats.add("dp", ring_bytes(nbytes, self.dp_size, "all_gather"))

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"step": tensor, "blocks": {name: {key: tensor}}}``: the blocks this rank owns, as local tensors
        (the checkpoint gives them global views: ``elementwise`` keys take the parameter's placement)."""
        blocks = {self.names[id(p)]: dict(self.state[p]) for g in self.param_groups for p in g["params"]
                  if self.owns(p)}
        return {"step": torch.tensor(self.step_count, dtype=torch.int64), "blocks": blocks}

    def load_state_dict(self, state: dict) -> None:
        """Copy a ``state_dict()``-shaped dict (local tensors of the owned blocks) into this rank's state."""
        self.step_count = int(state["step"])
        params = {self.names[id(p)]: p for g in self.param_groups for p in g["params"]}
        for name, block in state["blocks"].items():
            dst = self.state[params[name]]
            for k, src in block.items():
                if src.data_ptr() != dst[k].data_ptr():
                    dst[k].copy_(src.view_as(dst[k]))


def adam_direction(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, betas, eps: float,
                   step: int) -> torch.Tensor:
    """Update the moments in place and return the bias-corrected Adam direction."""
    b1, b2 = betas
    m.lerp_(grad, 1.0 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    denom = (v / (1.0 - b2 ** step)).sqrt_().add_(eps)
    return (m / (1.0 - b1 ** step)).div_(denom)
