"""N:M sparse projection trained with SR-STE, and the state an N:M schedule drives."""

import torch
import torch.nn.functional as F
from torch import nn

from kernels.nm import nm_linear, nm_mask, nm_sparsify, srste_decay_
from model.structured.base import StructuredLinear, StructureError, normal_

# entries of the ``nm_phase`` buffer
DENSE, N_NOW, PRUNED_SCALE, FROZEN = range(4)


class NMSparseLinear(StructuredLinear):
    """Dense weight whose ``n`` largest magnitudes in every group of ``m`` inputs are applied.

    The mask follows the weights at every step (SR-STE: dense straight-through gradient plus ``decay`` times
    the pruned weights, once per optimizer step). ``from_dense`` is magnitude selection, exact for an already
    N:M-sparse matrix.

    Under an N:M schedule (``sparsity.rules`` method ``nm``, ``enable_schedule``) the layer also holds its
    phase as a persistent buffer ``nm_phase = [dense, n_now, pruned_scale, frozen]``: a dense warm-up applies
    the whole weight; ``n_now:m`` replaces ``n:m`` during structure decay (SDGF); pruned weights are applied
    times ``pruned_scale`` (mask decay, MDGF); a frozen mask (buffer ``frozen_mask``) no longer follows the
    weights and passes gradients to the kept weights only. The phase is state, so a checkpoint written
    mid-schedule computes what the run computed at that step wherever it is loaded.
    """

    name = "nm"
    optional = {"n": 2, "m": 4, "decay": 2e-4}
    example = {"n": 2, "m": 4}

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, decay: float = 2e-4):
        super().__init__(in_features, out_features)
        self.check_range("m", m, 1, in_features)
        self.check_divides("m", m, in_features=in_features)
        self.check_range("n", n, 1, m)
        self.check_range("decay", decay, 0.0, 1.0)
        self.n, self.m, self.decay = n, m, float(decay)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("nm_phase", None)  # set by enable_schedule
        self.register_buffer("frozen_mask", None)

    # -- schedule state ----------------------------------------------------------------------------------
    def enable_schedule(self, freeze: bool) -> None:
        """Register the phase buffer (and the frozen mask when the schedule ends with a fixed mask); before
        tensor-parallel sharding. The phase starts at the layer's own ``n:m`` with no mask decay."""
        self.register_buffer("nm_phase", torch.tensor([0.0, self.n, 0.0, 0.0], dtype=torch.float64))
        if freeze:
            self.register_buffer("frozen_mask", torch.ones(self.out_features, self.in_features, dtype=torch.bool,
                                                           device=self.weight.device))

    def set_phase(self, dense: bool, n_now: int, pruned_scale: float, freeze: bool) -> None:
        """Set the phase of this step. ``freeze`` takes the current ``n_now:m`` mask of the weights as the fixed
        mask (the first frozen step); once frozen the layer stays frozen."""
        if self.nm_phase is None:
            raise StructureError("nm: enable_schedule() before set_phase()")
        frozen = bool(self.nm_phase[FROZEN])
        with torch.no_grad():
            if freeze and not frozen:
                if self.frozen_mask is None:
                    raise StructureError("nm: the schedule freezes the mask but enable_schedule(freeze=False)")
                self.frozen_mask.copy_(nm_mask(self.weight.detach(), n_now, self.m))
                frozen = True
            self.nm_phase.copy_(torch.tensor([float(dense), n_now, pruned_scale, float(frozen)],
                                             dtype=torch.float64))

    def phase(self) -> tuple[bool, int, float, bool]:
        """``(dense, n_now, pruned_scale, frozen)``; without a schedule ``(False, n, 0.0, False)``."""
        if self.nm_phase is None:
            return False, self.n, 0.0, False
        d, n, a, f = self.nm_phase.tolist()
        return bool(d), int(n), float(a), bool(f)

    def current_mask(self) -> torch.Tensor | None:
        """The ``[out, in]`` mask in force (None during a dense warm-up)."""
        dense, n, _, frozen = self.phase()
        if dense:
            return None
        return self.frozen_mask if frozen else nm_mask(self.weight.detach(), n, self.m)

    def prune_units(self) -> tuple[int, int, int]:
        """``(kept weights, weights, 1)``: every weight counts while it is applied (dense warm-up, or mask decay
        with ``pruned_scale > 0``); otherwise ``n_now / m`` of them."""
        dense, n, a, _ = self.phase()
        units = self.weight.numel()
        return (units if dense or a > 0 else units * n // self.m), units, 1

    # -- the product -------------------------------------------------------------------------------------
    def effective_weight(self, phase: tuple[bool, int, float, bool] | None = None) -> torch.Tensor:
        """The ``[out, in]`` matrix applied in ``phase`` (default: the current one; straight-through gradient
        while the mask follows the weights)."""
        dense, n, a, frozen = phase or self.phase()
        if dense:
            return self.weight
        if frozen:
            return self.weight * self.frozen_mask
        return nm_sparsify(self.weight, n, self.m, a)

    def forward(self, x):
        x = self._at("in", x)
        phase = dense, n, a, frozen = self.phase()  # read once per call (a host read of the buffer)
        if not (dense or frozen) and a == 0.0:
            y = nm_linear(x, self.weight, n, self.m)
        else:
            y = F.linear(x, self.effective_weight(phase))
        return self._at("out", y)

    def regularize_grad(self):
        dense, n, _, frozen = self.phase()
        if self.weight.grad is not None and not (dense or frozen):
            srste_decay_(self.weight, self.weight.grad, n, self.m, self.decay)

    def reset_parameters(self, std, generator=None):
        normal_(self.weight, std, generator)
        with torch.no_grad():  # rescale so the *kept* entries carry the dense output variance exactly
            kept = self.weight * nm_mask(self.weight, self.n, self.m)
            self.weight.mul_(std * self.weight.numel() ** 0.5 / kept.norm())

    def shard(self, tp_rank, tp_size, style, comm):
        # Like dense; a row split keeps every group of m inputs on one rank, so local masks are the global ones.
        self.check_tp(tp_size, **({"out_features": self.out_features} if style == "column"
                                  else {"groups_of_m": self.in_features // self.m}))
        names = ("weight",) + (("frozen_mask",) if self.frozen_mask is not None else ())
        return self._dense_style_shard(tp_rank, tp_size, style, comm, names)

    def to_dense(self):
        return self.effective_weight()

    def _fit(self, w):
        self._copy(self.weight, w)

    def num_params(self):
        return self.out_features * self.in_features * self.n // self.m

    def executed_flops(self, tokens, device=None):
        # the masked weight is applied as a dense product (the Triton kernel masks its loads); no 2:4 sparse
        # tensor cores are used
        return 2 * tokens * self.out_features * self.in_features
