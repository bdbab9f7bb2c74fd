"""Sparse pretraining schedules and average-parameter accounting (``sparsity.rules`` in the config).

Built: ``gmp``, gradual magnitude pruning (Zhu and Gupta, "To prune, or not to prune", 2017; the schedule
*The Journey Matters*, arXiv 2501.12486, finds near-optimal between 25% and 75% of training). The density of
the selected projections follows the cubic schedule

    d(t) = target + (1 - target) * (1 - (t - t0) / (t1 - t0))^3   for t0 <= t <= t1,

with ``t0 = round(start * steps)``, ``t1 = round(end * steps)``, 1 before ``t0`` and ``target`` after ``t1``;
masks are recomputed at the start of steps ``t0, t0 + interval, ...`` and at ``t1``, keeping the
``round(d * units)`` units (weights or square blocks) of largest magnitude of the masked weights, so a pruned
unit stays pruned. Deviation from the paper's TensorFlow code: the threshold is exact (the k-th largest score),
not a histogram estimate.

Thresholds are agreed across ranks: the k-th largest score over a projection (its tensor-parallel shards) or
over every selected projection (``scope: global``; shards and pipeline stages) is found by bisection on the
float32 bit patterns of the scores, 31 rounds of one all-reduce of counts each. Given the same weights, every
(dp, tp, pp) therefore keeps exactly the single-process masks.

Accounting (logged and checkpointed): the density of the pruned units, the effective parameter count, the
average parameter count over the steps so far, and the training FLOPs spent so far at the density of each
step (3x the forward FLOPs; every pruned weight saves 2 forward FLOPs per token).

``nm``: the schedule of N:M projections (SR-STE, Zhou et al. 2021; progressive gradient flow, Bambhaniya et
al., arXiv 2402.04744, reference code abhibambhaniya/progressive_gradient_flow_nm_sparsity). With
``t0, t1 = boundaries(rule)``: dense before ``t0``; on ``[t0, t1)`` the mask follows the weights (SR-STE's decay
from the structure spec, once per step), pruned weights applied times ``a(s)`` (MDGF, ``s = t - t0``:
``max(0, 1 - c s)`` or ``exp(-c s)``) and, with SDGF, the pattern ``(m-1):m`` in the first of ``K =
ceil(log2(m/n))`` equal frames and ``m/2^i:m`` in frame ``i``; from ``t1`` (when ``end`` < 1) the ``n:m`` mask of
the weights at ``t1`` is frozen and only the kept weights train. Every quantity is a pure function of the step
except the frozen mask, a layer buffer.

``self_guided``, ``dense_to_structured`` and ``block_size_search``: see ``SparsityRule`` (pretrain/config.py)
and the README's table of methods.

Masks, N:M phases, guides and the chosen block size are layer buffers and parameters (model state: they
reshard like their weights); the accumulators and the block-size search's scores are this object's
``state_dict``.
"""

import dataclasses
import math
import zlib

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from model.config import PROJECTIONS, ModelConfig, StructureSpec, key_covers
from model.structured import StructuredLinear, StructureError
from pretrain.config import ConfigError, SparsityRule

BISECT_ROUNDS = 31
PRUNING = ("gmp", "nm", "block_size_search")
"""Methods that mask weights (their layers report ``prune_units``)."""
FLOAT_INF_BITS = 0x7F800000


def boundaries(rule: SparsityRule, steps: int) -> tuple[int, int]:
    """First and last mask-update steps ``(t0, t1)``."""
    t0 = round(rule.start * steps)
    return t0, max(t0 + 1, round(rule.end * steps))


def gmp_density(rule: SparsityRule, steps: int, step: int) -> float:
    """The cubic schedule's density at ``step`` (1 before ``t0``, ``target`` from ``t1``)."""
    t0, t1 = boundaries(rule, steps)
    if step <= t0:
        return 1.0
    if step >= t1:
        return rule.target
    return rule.target + (1.0 - rule.target) * (1.0 - (step - t0) / (t1 - t0)) ** 3


def is_update_step(rule: SparsityRule, steps: int, step: int) -> bool:
    t0, t1 = boundaries(rule, steps)
    return step == t1 or (t0 <= step < t1 and (step - t0) % rule.interval == 0)


def nm_phase(rule: SparsityRule, steps: int, step: int, n: int, m: int) -> tuple[bool, int, float, bool]:
    """``(dense, n_now, pruned_scale, frozen)`` of an ``nm`` rule's layer with final pattern ``n:m`` at ``step``."""
    t0, t1 = boundaries(rule, steps)
    if step < t0:
        return True, m, 1.0, False
    if step >= t1:
        return False, n, 0.0, True
    s, span = step - t0, t1 - t0
    if rule.mask_decay == "none":
        a = 0.0
    else:
        c = rule.decay_coef or (1.0 if rule.mask_decay == "linear" else 5.0) / span
        a = max(0.0, 1.0 - c * s) if rule.mask_decay == "linear" else math.exp(-c * s)
    n_now = n
    if rule.structure_decay:
        frames = max(1, math.ceil(math.log2(m / n)))
        i = s * frames // span
        n_now = max(n, m - 1 if i == 0 else m >> i)
    return False, n_now, a, False


def guide_scale(rule: SparsityRule, steps: int, step: int) -> float:
    """The guide's weight ``a`` of a ``self_guided`` rule at ``step``: 1 before ``t0``, 0 from ``t1``."""
    t0, t1 = boundaries(rule, steps)
    if step < t0:
        return 1.0
    if step >= t1:
        return 0.0
    r = (step - t0) / (t1 - t0)
    return 0.5 * (1.0 + math.cos(math.pi * r)) if rule.guide_decay == "cosine" else 1.0 - r


def guide_draw(seed: int, step: int, name: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, step, layer): every rank of the layer, any micro-batching and
    any resume draw the same one."""
    return zlib.crc32(f"{seed}/{step}/{name}".encode()) / 2**32


def guides_done(layers: dict[str, StructuredLinear], rules: list[SparsityRule], steps: int, step: int) -> list[str]:
    """Names of the layers whose ``self_guided`` rule has ended by ``step`` and that still hold their guide."""
    return [name for rule in rules if rule.method == "self_guided" and step >= boundaries(rule, steps)[1]
            for name, layer in selected(layers, rule).items() if layer.guide is not None]


def dense_first(model: ModelConfig, rules: list[SparsityRule], steps: int, step: int) -> ModelConfig:
    """``model`` with the projections of every ``dense_to_structured`` rule not yet converted in a checkpoint of
    ``step`` dense (the conversion happens at the start of its step ``k``, after the checkpoint of step ``k``)."""
    pending = [r for r in rules if r.method == "dense_to_structured" and step <= boundaries(r, steps)[0]]
    if not pending:
        return model
    structure = dict(model.structure)
    for proj in PROJECTIONS:
        if any(key_covers(r.select, proj) for r in pending):
            structure[proj] = StructureSpec("dense")
    return dataclasses.replace(model, structure=structure)


def conversion_steps(rules: list[SparsityRule], steps: int) -> set[int]:
    """The steps at which ``dense_to_structured`` rules convert."""
    return {boundaries(r, steps)[0] for r in rules if r.method == "dense_to_structured"}


def conversions_due(layers: dict[str, StructuredLinear], rules: list[SparsityRule], model: ModelConfig, steps: int,
                    first: int, last: int) -> dict[str, StructureSpec]:
    """The layers of ``dense_to_structured`` rules converting at a step in ``[first, last]``, and the structure
    each becomes."""
    due = {}
    for rule in rules:
        if rule.method == "dense_to_structured" and first <= boundaries(rule, steps)[0] <= last:
            for name in selected(layers, rule):
                due[name] = model.spec_for(slot_of(name))
    return due


def slot_of(name: str) -> str:
    """``layers.3.mlp.up`` -> ``up``."""
    return name.rsplit(".", 1)[-1]


def selected(layers: dict[str, StructuredLinear], rule: SparsityRule) -> dict[str, StructuredLinear]:
    """The projections (by qualified name) that ``rule.select`` covers."""
    return {n: m for n, m in layers.items() if key_covers(rule.select, slot_of(n))}


def enable_pruning(layers: dict[str, StructuredLinear], rules: list[SparsityRule]) -> None:
    """Give every projection a rule selects its mask or schedule state (on the full model, before tensor
    parallelism)."""
    for i, rule in enumerate(rules):
        for name, layer in selected(layers, rule).items():
            try:
                if rule.method == "nm":
                    layer.enable_schedule(freeze=rule.end < 1.0)
                elif rule.method == "block_size_search":
                    layer.enable_block_search(rule.block_sizes)
                elif rule.method == "self_guided":
                    layer.enable_guide()
                elif rule.method == "dense_to_structured":
                    continue  # no state until the conversion
                else:
                    layer.enable_pruning(rule.granularity, rule.m if rule.granularity == "nm" else rule.block_size)
            except StructureError as e:
                raise ConfigError(f"sparsity.rules[{i}] ({name}): {e}") from None


def _all_reduce(t: torch.Tensor, *groups: ProcessGroup | None) -> torch.Tensor:
    for g in groups:
        if g is not None:
            dist.all_reduce(t, group=g)
    return t


def kth_largest_bits(scores: list[torch.Tensor], k: torch.Tensor, groups: tuple) -> torch.Tensor:
    """For each entry ``i``: the largest float32 bit pattern ``b`` with ``count(bits(scores[i]) >= b) >= k[i]``
    over all ranks of ``groups`` (scores are non-negative, whose bit patterns order like their values)."""
    bits = [s.contiguous().view(torch.int32).flatten() for s in scores]
    lo = torch.zeros(len(bits), dtype=torch.int64)
    hi = torch.full((len(bits),), FLOAT_INF_BITS, dtype=torch.int64)
    for _ in range(BISECT_ROUNDS):
        mid = (lo + hi + 1) // 2
        counts = torch.stack([(b >= m).sum() for b, m in zip(bits, mid.tolist())]) if bits else lo.clone()
        _all_reduce(counts, *groups)
        ok = counts >= k
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid - 1)
    return lo


class SparsitySchedule:
    """Applies the rules to this rank's projections and keeps the accounting (a ``Stateful``)."""

    def __init__(self, rules: list[SparsityRule], steps: int, layers: dict[str, StructuredLinear],
                 tp_group: ProcessGroup | None, pp_group: ProcessGroup | None, params: int, forward_flops: int,
                 tokens_per_step: int, seed: int = 0):
        self.rules, self.steps = rules, steps
        self.tp_group, self.pp_group = tp_group, pp_group
        self.dense_params, self.forward_flops, self.tokens_per_step = params, forward_flops, tokens_per_step
        self.seed, self.layers = seed, layers
        self.selected = [selected(layers, r) for r in rules]
        for i, (rule, sel) in enumerate(zip(rules, self.selected)):
            if rule.method not in PRUNING or rule.method == "block_size_search":
                continue
            sizes = {m.prune_units()[2] for m in sel.values()}
            sizes = set().union(*[s for s in gather_pp(sizes, pp_group)])
            if rule.scope == "global" and len(sizes) > 1:
                raise ConfigError(f"sparsity.rules[{i}].scope=global needs one unit size; the selected "
                                  f"projections prune units of {sorted(sizes)} weights")
        # ``params`` and ``forward_flops`` count each projection at its structure's own size; a schedule moves
        # the nm ones through denser phases, so the accounting starts from every scheduled unit kept.
        extra = torch.zeros(1, dtype=torch.float64)
        for m in self._pruned_layers():
            _, units, size = m.prune_units()
            extra += units * size - m.num_params()
        extra = float(_all_reduce(extra, tp_group, pp_group))
        self.dense_params, self.forward_flops = params + extra, forward_flops + 2 * extra
        self.phases: dict[str, int] = {}
        """Kept weights of each ``nm`` layer at the last step (to report densities when they change)."""
        self.nm_scale: float | None = None
        self.guide_weight: float | None = None
        self._read_phases()
        self.search = {i: torch.zeros(len(r.block_sizes) + 1, dtype=torch.float64) for i, r in enumerate(rules)
                       if r.method == "block_size_search"}
        """Per block-size-search rule: the summed retention of each candidate over the scorings so far, and
        (last entry) the number of scorings."""
        self.param_steps = 0.0
        """Sum over completed steps of the effective parameter count (for the average)."""
        self.flops_spent = 0.0
        self.steps_done = 0
        self.current = self._count()

    # -- masks --------------------------------------------------------------------------------------
    def update(self, step: int) -> dict[str, float]:
        """Recompute the masks of every rule whose schedule updates at ``step`` (call before the step's
        forward, on every rank); returns per-projection densities when something changed."""
        changed, reported = False, {}
        for i, (rule, sel) in enumerate(zip(self.rules, self.selected)):
            if rule.method == "self_guided":
                changed |= self._set_guides(rule, sel, step)
                continue
            if rule.method == "block_size_search":
                reported.update(self._search_block_size(i, rule, sel, step))
            if rule.method == "dense_to_structured":
                continue  # the trainer converts (conversions_due): it swaps parameters
            if rule.method == "nm":
                changed |= self._set_nm_phases(rule, sel, step)
                continue
            if not is_update_step(rule, self.steps, step):
                continue
            density = gmp_density(rule, self.steps, step)
            if rule.granularity == "nm":  # per group: no threshold to agree on (a row split keeps groups whole)
                n = max(round(rule.target * rule.m), min(rule.m, round(density * rule.m)))
                for layer in sel.values():
                    layer.set_group_mask(n, rule.m)
                changed = True
                continue
            names = sorted(sel)
            scores = [sel[n].prune_scores() for n in names]
            units = torch.tensor([s.numel() for s in scores], dtype=torch.int64)
            if rule.scope == "projection":
                _all_reduce(units, self.tp_group)
                k = torch.clamp((units.double() * density).round().long(), min=1)
                thresholds = kth_largest_bits(scores, k, (self.tp_group,))
            else:
                total = _all_reduce(units.sum().reshape(1), self.tp_group, self.pp_group)
                k = torch.clamp((total.double() * density).round().long(), min=1)
                flat = torch.cat([s.flatten() for s in scores]) if scores else torch.zeros(0)
                (t,) = kth_largest_bits([flat], k, (self.tp_group, self.pp_group)).tolist()
                thresholds = torch.full((len(names),), t, dtype=torch.int64)
            for n, s, t in zip(names, scores, thresholds.tolist()):
                sel[n].set_prune_mask(s.contiguous().view(torch.int32) >= t)
            changed = True
        if not changed:
            return reported
        self.current = self._count()
        return {**reported, **self._per_projection()}

    def _set_nm_phases(self, rule: SparsityRule, sel: dict[str, StructuredLinear], step: int) -> bool:
        """Set this step's phase on every layer of an ``nm`` rule; True when a density changed."""
        changed = False
        for name, layer in sel.items():
            dense, n_now, a, frozen = nm_phase(rule, self.steps, step, layer.n, layer.m)
            layer.set_phase(dense, n_now, a, freeze=frozen)
            kept = layer.prune_units()[0]
            changed |= self.phases.get(name) != kept
            self.phases[name] = kept
            self.nm_scale = a
        return changed

    def _search_block_size(self, i: int, rule: SparsityRule, sel: dict[str, StructuredLinear], step: int) -> dict:
        """Before ``t0``, every ``interval`` steps: score each candidate block size by the energy its best blocks
        at ``target`` density retain (over every selected projection, all ranks). At ``t0``: fix the largest
        candidate within ``tolerance`` of the smallest's mean retention."""
        t0 = boundaries(rule, self.steps)[0]
        if step > t0 or (step < t0 and step % rule.interval):
            return {}
        sums = self.search[i]
        if step < t0 or sums[-1] == 0:
            sums[:-1] += self._retention(rule, sel)
            sums[-1] += 1
        mean = (sums[:-1] / sums[-1]).tolist()
        out = {f"sparsity/block_search/{bs}": r for bs, r in zip(rule.block_sizes, mean)}
        if step == t0:
            best = max(bs for bs, r in zip(rule.block_sizes, mean) if r >= (1.0 - rule.tolerance) * mean[0])
            for layer in sel.values():
                layer.set_prune_block(best)
            out["sparsity/block_size"] = best
        return out

    def _retention(self, rule: SparsityRule, sel: dict[str, StructuredLinear]) -> torch.Tensor:
        """For each candidate block size: the fraction of the selected weights' energy in their ``target``
        fraction of largest blocks (exact k-th largest over all ranks, as the pruning threshold)."""
        out = []
        for bs in sorted(rule.block_sizes):
            scores = [sel[n].block_scores(bs).flatten() for n in sorted(sel)]
            flat = torch.cat(scores) if scores else torch.zeros(0)
            units = _all_reduce(torch.tensor([flat.numel()], dtype=torch.int64), self.tp_group, self.pp_group)
            k = torch.clamp((units.double() * rule.target).round().long(), min=1)
            (t,) = kth_largest_bits([flat], k, (self.tp_group, self.pp_group)).tolist()
            kept = flat[flat.view(torch.int32) >= t].double().sum()
            energy = _all_reduce(torch.stack([kept, flat.double().sum()]), self.tp_group, self.pp_group)
            out.append(float(energy[0] / energy[1].clamp_min(1e-30)))
        return torch.tensor(out, dtype=torch.float64)

    def _set_guides(self, rule: SparsityRule, sel: dict[str, StructuredLinear], step: int) -> bool:
        """Set this step's guide weight (and, in the stochastic mode, whether each guide runs); True when the
        applied guide parameters changed."""
        a = guide_scale(rule, self.steps, step)
        changed = a != self.guide_weight
        self.guide_weight = a
        for name, layer in sel.items():
            if layer.guide is None:
                continue
            on = a > 0 and (not rule.stochastic or guide_draw(self.seed, step, name) < a)
            changed |= bool(layer.guide_state[1]) != on
            layer.set_guide(a, on)
        return changed

    def guides_done(self, step: int) -> list[str]:
        """Names of this rank's layers whose guide has weight 0 from ``step`` on and is still held (to free)."""
        return guides_done(self.layers, self.rules, self.steps, step)

    def _pruned_layers(self):
        """The layers of the ``gmp`` and ``nm`` rules (which report ``prune_units``)."""
        for rule, sel in zip(self.rules, self.selected):
            if rule.method in PRUNING:
                yield from sel.values()

    def _guided_layers(self):
        for rule, sel in zip(self.rules, self.selected):
            if rule.method == "self_guided":
                yield from sel.values()

    def _read_phases(self) -> None:
        """Take the ``nm`` layers' phases as they are (built, or loaded from a checkpoint)."""
        for rule, sel in zip(self.rules, self.selected):
            if rule.method == "nm":
                for name, layer in sel.items():
                    self.phases[name] = layer.prune_units()[0]
                    self.nm_scale = layer.phase()[2]
            elif rule.method == "self_guided":
                for layer in sel.values():
                    if layer.guide is not None:
                        self.guide_weight = float(layer.guide_state[0])

    def _count(self) -> dict[str, float]:
        """Kept and total prunable parameters over all rules (all ranks), and the effective parameter count."""
        local = torch.zeros(4, dtype=torch.float64)
        for m in self._pruned_layers():
            kept, units, size = m.prune_units()
            local[:2] += torch.tensor([kept * size, units * size], dtype=torch.float64)
        for m in self._guided_layers():
            if m.guide is not None and float(m.guide_state[0]) > 0:
                local[2] += m.guide.numel()
                local[3] += m.guide.numel() * float(m.guide_state[1])
        _all_reduce(local, self.tp_group, self.pp_group)
        kept, total, guides, running = local.tolist()
        return {"kept": kept, "total": total, "guides": guides, "running": running,
                "params": self.dense_params - (total - kept) + guides}

    def _per_projection(self) -> dict[str, float]:
        mine = {}
        for rule, sel in zip(self.rules, self.selected):
            for n, m in sel.items() if rule.method in PRUNING else ():
                kept, units, _ = m.prune_units()
                mine[n] = torch.tensor([kept, units], dtype=torch.float64)
        names = sorted(mine)
        stacked = torch.stack([mine[n] for n in names]) if names else torch.zeros(0, 2, dtype=torch.float64)
        _all_reduce(stacked, self.tp_group)
        return merge_pp({f"sparsity/density/{n}": float(c[0] / c[1]) for n, c in zip(names, stacked)},
                        self.pp_group)

    def rebase(self, layers: dict[str, StructuredLinear], params: float, forward_flops: float) -> None:
        """Take the layers anew after ``dense_to_structured`` replaced some, whose parameters and forward FLOPs per
        token changed by ``params`` and ``forward_flops`` (summed over all ranks)."""
        self.layers = layers
        self.selected = [selected(layers, r) for r in self.rules]
        self.dense_params += params
        self.forward_flops += forward_flops
        self.current = self._count()

    # -- accounting ---------------------------------------------------------------------------------
    def account_step(self) -> None:
        """Count one completed optimizer step at the current density."""
        c = self.current
        pruned = c["total"] - c["kept"]
        self.param_steps += c["params"]
        self.flops_spent += 3.0 * (self.forward_flops - 2.0 * pruned + 2.0 * c["running"]) * self.tokens_per_step
        self.steps_done += 1

    def metrics(self) -> dict[str, float]:
        c = self.current
        out = {"sparsity/params": c["params"], "sparsity/flops_spent": self.flops_spent,
               "sparsity/avg_params": self.param_steps / self.steps_done if self.steps_done else c["params"]}
        if c["total"]:
            out["sparsity/density"] = c["kept"] / c["total"]
        if self.nm_scale is not None:
            out["sparsity/nm_pruned_scale"] = self.nm_scale
        if self.guide_weight is not None:
            out["sparsity/guide_scale"] = self.guide_weight
            out["sparsity/guide_params"] = c["guides"]
        return out

    def state_dict(self) -> dict:
        return {"param_steps": torch.tensor(self.param_steps, dtype=torch.float64),
                "flops_spent": torch.tensor(self.flops_spent, dtype=torch.float64),
                "steps_done": torch.tensor(self.steps_done, dtype=torch.int64),
                **{f"block_search_{i}": t for i, t in self.search.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        for i, t in self.search.items():
            t.copy_(state_dict[f"block_search_{i}"])
        self.param_steps = float(state_dict["param_steps"])
        self.flops_spent = float(state_dict["flops_spent"])
        self.steps_done = int(state_dict["steps_done"])
        self.current = self._count()  # the masks and phases were loaded with the model
        self._read_phases()


def merge_pp(local: dict, pp_group: ProcessGroup | None) -> dict:
    """The union of every pipeline stage's ``local`` dict (each stage reports its own layers)."""
    merged = {}
    for part in gather_pp(local, pp_group):
        merged.update(part)
    return merged


def gather_pp(obj, pp_group: ProcessGroup | None) -> list:
    if pp_group is None:
        return [obj]
    out = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(out, obj, group=pp_group)
    return out


def describe(rules: list[SparsityRule], steps: int) -> str:
    parts = []
    for i, r in enumerate(rules):
        t0, t1 = boundaries(r, steps)
        if r.method == "block_size_search":
            parts.append(f"rules[{i}]: block_size_search {r.select}: block sizes {r.block_sizes} scored every "
                         f"{r.interval} steps before step {t0}, then gmp to density {r.target} by step {t1}")
            continue
        if r.method == "dense_to_structured":
            parts.append(f"rules[{i}]: dense_to_structured {r.select}: dense until step {t0}, then from_dense into "
                         "model.structure")
            continue
        if r.method == "self_guided":
            parts.append(f"rules[{i}]: self_guided {r.select}: dense guide weight 1 to step {t0}, {r.guide_decay} "
                         f"to 0 at step {t1} (then freed)" + (", stochastic" if r.stochastic else ""))
            continue
        if r.method == "nm":
            flow = [f"mask decay {r.mask_decay}"] + (["structure decay"] if r.structure_decay else [])
            parts.append(f"rules[{i}]: nm {r.select}: dense to step {t0}, then {', '.join(flow)}"
                         + (f", mask fixed from step {t1}" if r.end < 1.0 else ""))
            continue
        parts.append(f"rules[{i}]: {r.method} {r.select} -> density {r.target} over steps {t0}-{t1} every "
                     f"{r.interval} ({r.granularity}, {r.scope})")
    return "; ".join(parts)


__all__ = ["SparsitySchedule", "boundaries", "conversion_steps", "conversions_due", "dense_first", "describe",
           "enable_pruning", "gather_pp", "gmp_density", "guide_draw", "guide_scale", "guides_done", "is_update_step",
           "kth_largest_bits", "merge_pp", "nm_phase"]
