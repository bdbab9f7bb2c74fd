"""The interface every structured linear layer implements, and what they share."""

import abc
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.blocksparse import blocksparse_linear, kept_blocks_pay, use_kept_blocks
from kernels.nm import nm_mask
from model.config import divisors


class StructureError(ValueError):
    """A structure spec that does not fit the layer it is asked to build."""


class TensorParallelComm(Protocol):
    """The conjugate communication operators a sharded layer applies at its own chosen points.

    Supplied by ``parallel/tensor.py`` (Megatron's mappings on a process group); ``model/`` never sees the
    group itself.
    """

    rank: int
    size: int

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """Identity forward, all-reduce of the gradient backward."""
        ...

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce forward, identity backward."""
        ...

    def scatter(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the last dim forward, all-gather of the gradient backward."""
        ...

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather along the last dim forward, this rank's slice of the gradient backward."""
        ...

    def all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk ``i`` of dim 0 (``size`` chunks) goes to rank ``i``; received chunks stack in rank order.
        The gradient takes the same exchange back."""
        ...


Style = Literal["column", "row"]


@dataclass
class LayerShard:
    """What ``shard()`` returns: the local layer and how its tensors relate to the global ones.

    ``placements`` maps every parameter and persistent buffer name to the dim split across tensor-parallel
    ranks (even chunks in rank order), or None where the tensor is replicated. ``partial_grads`` names
    replicated parameters whose gradients are partial sums to be all-reduced over the tensor-parallel group.
    """

    layer: "StructuredLinear"
    placements: dict[str, int | None]
    partial_grads: tuple[str, ...] = field(default_factory=tuple)


@runtime_checkable
class StructuredLinearProtocol(Protocol):
    """Contract of the structured linear family: ``x[..., in] -> y[..., out]``."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def to_dense(self) -> torch.Tensor:
        """The exact ``[out, in]`` matrix the layer applies (differentiable in the parameters)."""
        ...

    @classmethod
    def from_dense(cls, w: torch.Tensor, **params) -> "StructuredLinearProtocol":
        """Best structured approximation of ``w``; sets ``projection_error`` (relative Frobenius)."""
        ...

    def num_params(self) -> int:
        """Effective trainable parameters (non-zeros for sparse kinds)."""
        ...

    def flops(self, tokens: int) -> int:
        """Forward FLOPs (2 per multiply-add) to apply the layer to ``tokens`` rows."""
        ...

    def shard(self, tp_rank: int, tp_size: int, style: Style, comm: TensorParallelComm) -> LayerShard:
        """The local layer of a tensor-parallel rank, and its placements."""
        ...


class StructuredLinear(nn.Module, abc.ABC):
    """Shared base: construction checks, init scaling and the projection error.

    Subclasses set ``name``, ``required``, ``optional`` (spec field -> default) and ``example`` (a spec that
    fits every layer the tests and benchmarks build: dimensions that are multiples of 16, split over up to 4
    tensor-parallel ranks) and implement ``reset_parameters``, ``forward``, ``to_dense``, ``_fit`` (used by
    ``from_dense``), ``num_params`` and ``shard``.
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[dict[str, object]] = {}
    example: ClassVar[dict[str, object]] = {}
    """Hyper-parameters of the example spec that tests and benchmarks use (``example_spec(kind)``)."""
    prune_granularities: ClassVar[tuple[str, ...]] = ()
    """Magnitude-pruning granularities the structure supports (``element``, ``block``); empty: not prunable."""

    projection_error: float | None = None

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._comm: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.register_parameter("guide", None)  # self-guided training's dense path (enable_guide)
        self.register_buffer("guide_state", None)
        self._guide_comm: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def _at(self, point: str, t: torch.Tensor) -> torch.Tensor:
        """Apply the communication a tensor-parallel shard placed at ``point`` of the forward (else identity)."""
        hook = self._comm.get(point)
        return t if hook is None else hook(t)

    # -- tensor parallelism ---------------------------------------------------------------------------
    @abc.abstractmethod
    def shard(self, tp_rank: int, tp_size: int, style: Style, comm: TensorParallelComm) -> LayerShard:
        """The local layer of ``tp_rank`` for a ``column`` (output-split) or ``row`` (input-split) projection.

        A column shard takes the replicated input and returns its slice of the output (its backward returns
        the full input gradient); a row shard takes its slice of the input and returns the full output.
        Each structure places the communication where the tensor is smallest.
        """

    def _local(self, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
               hooks: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> "StructuredLinear":
        """A copy of this layer with local shapes, the given (sliced) tensors and communication hooks."""
        local = copy.deepcopy(self)
        for name, t in tensors.items():
            if name in local._parameters:
                local._parameters[name] = nn.Parameter(t.detach().clone())
            else:
                local._buffers[name] = t.detach().clone()
        local.in_features, local.out_features = in_features, out_features
        local._comm = dict(hooks)
        return local

    def _dense_style_shard(self, tp_rank: int, tp_size: int, style: Style, comm: TensorParallelComm,
                           names: tuple[str, ...] = ("weight",)) -> LayerShard:
        """Megatron's dense split: each named ``[out, in]``-shaped tensor (or a grid over it) is split along dim 0
        (``column``: output rows; the input gradient is all-reduced) or dim 1 (``row``: input columns; the
        partial outputs are all-reduced). The caller checks that its units divide over ``tp_size``."""
        dim = 0 if style == "column" else 1
        tensors = {n: split(getattr(self, n), dim, tp_rank, tp_size) for n in names}
        if style == "column":
            local = self._local(self.in_features, self.out_features // tp_size, tensors, {"in": comm.copy})
        else:
            local = self._local(self.in_features // tp_size, self.out_features, tensors, {"out": comm.reduce})
        return LayerShard(local, {n: dim for n in names})

    @classmethod
    def check_tp(cls, tp_size: int, **dims: int) -> None:
        """Raise ``StructureError`` unless every named dimension splits evenly over ``tp_size`` ranks."""
        for name, d in dims.items():
            if d % tp_size:
                raise StructureError(f"{cls.name}: {name}={d} does not split over parallel.tp={tp_size}")

    # -- self-guided training (Building on Efficient Foundations; sparsity.rules method self_guided) ---------
    def enable_guide(self) -> None:
        """Add a dense guide ``G`` initialised to ``to_dense()`` (on the full layer, before tensor parallelism).
        The layer then applies ``a G x + (1 - a) S x`` with ``a, on = guide_state`` (``on``: the guide runs
        this step; in eval the mix runs whenever ``a > 0``)."""
        if self.guide is not None:
            return
        with torch.no_grad():
            self.guide = nn.Parameter(self.to_dense().detach().clone())
        self.register_buffer("guide_state", torch.tensor([1.0, 1.0], dtype=torch.float64))
        self.register_forward_hook(_mix_guide)

    def set_guide(self, scale: float, on: bool) -> None:
        with torch.no_grad():
            self.guide_state.copy_(torch.tensor([scale, float(on)], dtype=torch.float64))

    def free_guide(self) -> None:
        """Drop the guide (its schedule reached 0): it leaves the parameters and later checkpoints."""
        self.register_parameter("guide", None)
        self.register_buffer("guide_state", None)

    def applied_dense(self) -> torch.Tensor:
        """The ``[out, in]`` matrix the layer applies in eval: ``to_dense()``, mixed with a live guide."""
        w = self.to_dense()
        if self.guide is None:
            return w
        a = float(self.guide_state[0])
        return a * self.guide + (1.0 - a) * w if a > 0 else w

    def _guide_shard(self, local: "StructuredLinear", tp_rank: int, tp_size: int, style: Style,
                     comm: TensorParallelComm) -> dict[str, int | None]:
        """Split the guide like a dense projection of ``style`` into ``local``; its placements."""
        if self.guide is None:
            return {}
        dim = 0 if style == "column" else 1
        local.guide = nn.Parameter(split(self.guide.detach(), dim, tp_rank, tp_size).clone())
        local._guide_comm = {"in": comm.copy} if style == "column" else {"out": comm.reduce}
        return {"guide": dim, "guide_state": None}

    def shard_all(self, tp_rank: int, tp_size: int, style: Style, comm: TensorParallelComm) -> LayerShard:
        """``shard()`` plus what the base class adds to every structure (the self-guided dense path)."""
        shard = self.shard(tp_rank, tp_size, style, comm)
        shard.placements.update(self._guide_shard(shard.layer, tp_rank, tp_size, style, comm))
        return shard

    def enable_pruning(self, granularity: str, block_size: int | None) -> None:
        """Give the layer a magnitude-prunable mask (before tensor-parallel sharding); structures that support
        it mix in ``BlockMasked``."""
        raise StructureError(f"{self.name} cannot be magnitude-pruned; prunable: dense, blocksparse")

    def regularize_grad(self) -> None:
        """Add this layer's gradient regulariser (SR-STE's decay for ``nm``) to its accumulated gradients.

        Called once per optimizer step after the last backward, never per backward call, so training does not
        depend on micro-batching or topology. The default adds nothing."""

    # -- construction helpers ---------------------------------------------------------------------
    @classmethod
    def check_divides(cls, field: str, value: int, **dims: int) -> None:
        """Raise ``StructureError`` unless ``value`` divides every named dimension."""
        if value <= 0 or any(d % value for d in dims.values()):
            common = set(divisors(next(iter(dims.values()))))
            for d in dims.values():
                common &= set(divisors(d))
            shown = ", ".join(f"{k}={v}" for k, v in dims.items())
            raise StructureError(f"{cls.name}.{field}={value} must divide {shown}; "
                                 f"allowed: {sorted(common)}")

    @classmethod
    def check_range(cls, field: str, value, lo, hi, lo_open: bool = False) -> None:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bracket = "(" if lo_open else "["
            raise StructureError(f"{cls.name}.{field}={value} must lie in {bracket}{lo}, {hi}]")

    @abc.abstractmethod
    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        """Initialise so the output variance equals that of a dense layer with entries ``N(0, std^2)``."""

    @abc.abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The exact ``[out, in]`` matrix the layer applies (differentiable in the parameters)."""

    @abc.abstractmethod
    def num_params(self) -> int:
        """Effective trainable parameters (non-zeros for sparse kinds)."""

    def flops(self, tokens: int) -> int:
        """Forward FLOPs (2 per multiply-add) for ``tokens`` rows: every effective parameter is one multiply-add
        per row for every structure here (a subclass whose product costs otherwise overrides this)."""
        return 2 * tokens * self.num_params()

    def executed_flops(self, tokens: int, device: torch.device | None = None) -> int:
        """Forward FLOPs the products this layer runs execute on ``device`` (default: its own), zeros included:
        ``flops`` for the structures whose products touch only their parameters; a sparse kind applied as a dense
        masked product (no sparse kernel applies) executes the dense ``2 tokens in out``. MFU is reported on both."""
        return self.flops(tokens)

    # -- from_dense -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, w: torch.Tensor, **params) -> "StructuredLinear":
        """Best structured approximation of ``w`` (``[out, in]``).

        The returned layer carries ``projection_error = ||w - to_dense()||_F / ||w||_F``; it is exact (up to
        float error) when ``w`` already has the structure.
        """
        out_f, in_f = w.shape
        layer = cls(in_f, out_f, **params).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer._fit(w.detach().to(torch.float64))
            approx = layer.to_dense().to(torch.float64)
            layer.projection_error = float((w.double() - approx).norm() / w.double().norm().clamp_min(1e-30))
        return layer

    @abc.abstractmethod
    def _fit(self, w: torch.Tensor) -> None:
        """Set the parameters to the structured approximation of ``w`` (float64, ``[out, in]``)."""

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.to(dst.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, params={self.num_params()}"


class BlockMasked:
    """Mixin for a ``weight[out, in]`` applied under a mask of ``mask_block`` x ``mask_block`` blocks
    (``mask[out/bs, in/bs]``, bool; ``mask_block`` 1 masks elements). What a magnitude-pruning schedule needs:
    scores, kept counts and a way to set the mask; the schedule never asks which structure it prunes."""

    weight: nn.Parameter
    mask: torch.Tensor | None
    mask_block: int

    def dense_mask(self) -> torch.Tensor:
        """The mask expanded to ``[out, in]``."""
        bs = self.mask_block
        return self.mask if bs == 1 else self.mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.dense_mask()

    def masked_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ masked_weight()^T``; under a block mask that ``kernels.blocksparse`` finds worth it, over the kept
        blocks only (the same function; pruned blocks are never read)."""
        bs = self.mask_block
        if self.mask is not None and bs > 1 and use_kept_blocks(x, self.mask, bs):
            return blocksparse_linear(x, self.weight, self.mask, bs)
        return F.linear(x, self.masked_weight())

    @property
    def prune_block(self) -> int:
        """Side of the units a schedule prunes: ``mask_block``, or the size a block-size search chose (a multiple
        of it, kept in the buffer ``prune_block_size``)."""
        size = getattr(self, "prune_block_size", None)
        return self.mask_block if size is None else int(size)

    def set_prune_block(self, size: int) -> None:
        if size % self.mask_block:
            raise StructureError(f"{self.name}: prune block {size} is not a multiple of the mask block "
                                 f"{self.mask_block}")
        with torch.no_grad():
            self.prune_block_size.fill_(size)

    def block_scores(self, size: int) -> torch.Tensor:
        """Squared magnitude of every ``size`` x ``size`` block of the masked weight this rank holds (pruned units
        score 0), summed in float64 and rounded to float32."""
        return block_energy(self.masked_weight().detach().double(), size).float()

    def prune_scores(self) -> torch.Tensor:
        """``block_scores`` of the pruning units, shaped like their grid."""
        return self.block_scores(self.prune_block)

    def set_group_mask(self, n: int, m: int) -> None:
        """Keep the ``n`` largest magnitudes of the masked weight in every group of ``m`` consecutive inputs (pruned
        weights score 0, so they stay pruned while ``n`` decreases)."""
        self.set_prune_mask(nm_mask(self.masked_weight().detach(), n, m))

    def set_prune_mask(self, keep: torch.Tensor) -> None:
        """Keep the units ``keep`` (a bool grid of ``prune_block`` units)."""
        k = self.prune_block // self.mask_block
        if k > 1:
            keep = keep.repeat_interleave(k, 0).repeat_interleave(k, 1)
        with torch.no_grad():
            self.mask.copy_(keep)

    def prune_units(self) -> tuple[int, int, int]:
        """``(kept units, units, parameters per unit)`` of this rank's tensors."""
        k2 = (self.prune_block // self.mask_block) ** 2
        return int(self.mask.sum()) // k2, self.mask.numel() // k2, self.prune_block**2

    def kept_params(self) -> int:
        """Weights the mask keeps."""
        return int(self.mask.sum()) * self.mask_block**2

    def executed_flops(self, tokens: int, device: torch.device | None = None) -> int:
        """Forward FLOPs ``masked_linear`` executes on ``device`` (default: the weight's): the kept blocks where it
        runs them alone, else the dense masked product."""
        device = device if device is not None else self.weight.device
        if self.mask is not None and self.mask_block > 1 and kept_blocks_pay(device, self.mask, self.mask_block):
            return 2 * tokens * self.kept_params()
        return 2 * tokens * self.weight.numel()


def _mix_guide(layer: StructuredLinear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a guided layer: ``a G x + (1 - a) S x`` when the guide runs, else ``S x``."""
    if layer.guide is None:
        return out
    a, on = layer.guide_state.tolist()
    if a <= 0 or not (on or not layer.training):
        return out
    x = args[0]
    hook_in, hook_out = layer._guide_comm.get("in"), layer._guide_comm.get("out")
    g = F.linear(hook_in(x) if hook_in else x, layer.guide)
    g = hook_out(g) if hook_out else g
    return a * g + (1.0 - a) * out


def signed_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(w, full_matrices=False)`` (batched) with a sign convention: the largest-magnitude entry
    of every left singular vector is positive. The factors are then a continuous function of ``w`` (away from
    repeated singular values), so weights that differ by rounding give factors that differ by rounding."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    sign = largest_entry_sign(u, dim=-2)  # [..., k]
    return u * sign[..., None, :], s, vh * sign[..., :, None]


def largest_entry_sign(f: torch.Tensor, dim: int) -> torch.Tensor:
    """The sign (+1 for zero) of the largest-magnitude entry of every vector of ``f`` along ``dim`` (that dim
    removed): a sign convention for factors defined up to sign."""
    pick = f.abs().argmax(dim=dim, keepdim=True)
    sign = torch.sign(f.gather(dim, pick)).squeeze(dim)
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def block_energy(w: torch.Tensor, bs: int) -> torch.Tensor:
    """Squared Frobenius norm of every ``bs`` x ``bs`` block of ``w[out, in]``: ``[out/bs, in/bs]``."""
    out_f, in_f = w.shape
    return w.reshape(out_f // bs, bs, in_f // bs, bs).pow(2).sum(dim=(1, 3))


def split(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s even chunk of ``t`` along ``dim``."""
    return t.chunk(size, dim)[rank]


def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """In-place ``N(0, std^2)`` fill drawn from ``generator`` (on CPU, so every device draws the same)."""
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std))
    return t


NORMAL_CHUNK = 1 << 20
"""Elements per draw of ``normal_rows`` (rounded to whole rows and to a multiple of 16)."""


def normal_rows(rows: int, cols: int, std: float, generator: torch.Generator | None, keep: range,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``keep`` of ``torch.randn(rows, cols, generator=generator) * std``, bit for bit, drawing the matrix in
    chunks of about ``NORMAL_CHUNK`` elements and keeping only ``keep``: memory is one chunk plus the kept rows,
    and the generator ends where the full draw leaves it.

    torch's CPU normal fill draws one uniform per element in order and transforms them 16 at a time (a tail that
    is not a multiple of 16 redraws the last 16), so consecutive draws of multiples of 16 elements, the last
    at least 16 long, give the same values as one draw of the whole (tested). ``out`` (``[len(keep), cols]``, any
    device) receives the rows in place."""
    step = 16 // math.gcd(cols, 16)  # rows per chunk must make a multiple of 16 elements
    per = max(step, NORMAL_CHUNK // max(cols, 1) // step * step)
    if out is None:
        out = torch.empty(len(keep), cols)
    row = 0
    while row < rows:
        n = min(per, rows - row)
        if 0 < (rows - row - n) * cols < 16:  # never leave a tail shorter than 16 elements for the last draw
            n = rows - row
        block = torch.randn(n, cols, generator=generator, dtype=torch.float32)
        lo, hi = max(keep.start, row), min(keep.stop, row + n)
        if lo < hi:
            out[lo - keep.start:hi - keep.start] = block[lo - row:hi - row].mul_(std).to(out.device, out.dtype)
        row += n
    return out
