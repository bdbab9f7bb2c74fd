"""Sharded initialisation: each rank materialises only its own shards and stages, with the values a full-model
init from the same seed would give them, bit for bit.

The model is built on ``meta``, sharded (``apply_tp``) and split into stages there, and only this rank's stages
are allocated. ``ShardedInit`` then walks ``GPT.init_order`` with the one generator of the full init: each
projection is materialised on CPU on its own, initialised, prepared (the sparsity rules' masks, schedules and
guides), cut to this rank's shard by the layer's own ``shard_all`` and copied into the stage, then dropped; the
embedding and an untied head are drawn in chunks of rows, keeping this rank's vocabulary rows only
(``normal_rows``). A projection of another stage is drawn too (the generator must advance) but never kept. Peak
memory is this rank's part of the model plus one projection and one chunk, instead of the whole model.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import SLOTS
from model.gpt import GPT
from model.structured import StructuredLinear
from model.structured.base import normal_rows
from parallel.comm import GroupComm


@dataclass(frozen=True)
class LayerCount:
    """The exact counts of a full projection, kept after the layer itself is dropped (``GPT.num_params`` and
    ``GPT.flops_per_token`` take these in place of layers)."""

    params: int
    flops_per_token: int
    executed_per_token: int

    def num_params(self) -> int:
        return self.params

    def flops(self, tokens: int) -> int:
        return tokens * self.flops_per_token

    def executed_flops(self, tokens: int, device=None) -> int:
        return tokens * self.executed_per_token


class InitError(RuntimeError):
    """A tensor of this rank's model that the sharded initialisation did not fill (a bug, never a user error)."""


class ShardedInit:
    """Fills this rank's stages from ``seed`` as the full init would; ``counts`` then holds every full projection's
    parameter and FLOP counts by name (the whole model's accounting, which no rank holds).

    ``plain`` is the unsharded model on ``meta`` before ``prepare``: the template each projection is materialised
    from. ``prepare(name, layer)`` gives a freshly initialised full projection its sparsity state, as it was given
    to the full model before sharding.
    """

    def __init__(self, plain: GPT, seed: int, prepare: Callable[[str, StructuredLinear], None] | None = None):
        self.plain, self.seed, self.prepare = plain, seed, prepare
        self.counts: dict[str, LayerCount] = {}

    @torch.no_grad()
    def __call__(self, stages: dict[int, GPT], comm: GroupComm | None) -> None:
        for stage in stages.values():
            for t in [*stage.parameters(), *stage.buffers()]:
                if t.is_floating_point():
                    t.fill_(float("nan"))  # anything left unfilled is caught below
        gen = torch.Generator().manual_seed(self.seed)
        device = next(iter(stages.values())).rope_cos.device  # where the products will run (for executed FLOPs)
        rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
        for name, std in self.plain.init_order():
            unit = self.plain.get_submodule(name)
            owners = [s.get_submodule(name) for s in stages.values() if _holds(s, name)]
            if isinstance(unit, StructuredLinear):
                full = copy.deepcopy(unit).to_empty(device="cpu")
                full.reset_parameters(std, gen)
                if self.prepare is not None:
                    self.prepare(name, full)
                self.counts[name] = LayerCount(full.num_params(), full.flops(1), full.executed_flops(1, device))
                if owners:
                    style = SLOTS[name.rsplit(".", 1)[1]].style
                    local = full if comm is None else full.shard_all(rank, size, style, comm).layer
                    state = local.state_dict()
                    for target in owners:
                        target.load_state_dict(state)
            else:  # the token embedding or the head: [vocab, d], vocab-parallel rows
                rows, cols = unit.weight.shape
                per = rows // size
                keep = range(rank * per, (rank + 1) * per) if owners else range(0)
                # straight into the (single) stage that holds it; drawn and dropped by the others
                normal_rows(rows, cols, std, gen, keep, out=owners[0].weight.data if owners else None)
        for stage in stages.values():
            stage.init_fixed()  # RoPE, norms, and the tied head (to_empty() untied it)
            for key, t in stage.state_dict().items():
                if t.is_floating_point() and torch.isnan(t.sum(dtype=torch.float64)):  # no tensor-sized temporary
                    raise InitError(f"sharded initialisation left {key} unset")


def _holds(stage: GPT, name: str) -> bool:
    try:  # a deleted block, or an end a stage set to None, is not a submodule
        stage.get_submodule(name)
    except AttributeError:
        return False
    return True
