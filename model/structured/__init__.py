"""The structured linear family: one registry, one interface.

``build_linear(spec, in_features, out_features)`` is the only constructor the model uses; code outside
this package and ``kernels/`` never branches on a structure's name.
"""

from model.config import StructureSpec
from model.structured.base import StructuredLinear, StructuredLinearProtocol, StructureError
from model.structured.blast import BlastLinear
from model.structured.blockdiag import BlockDiagLinear
from model.structured.blocksparse import BlockSparseLinear
from model.structured.dense import DenseLinear
from model.structured.lowrank import LowRankLinear
from model.structured.monarch import MonarchLinear
from model.structured.nm import NMSparseLinear
from model.structured.sparse_lowrank import SparseLowRankLinear

REGISTRY: dict[str, type[StructuredLinear]] = {
    cls.name: cls
    for cls in (DenseLinear, LowRankLinear, BlockDiagLinear, MonarchLinear, BlastLinear,
                BlockSparseLinear, NMSparseLinear, SparseLowRankLinear)
}


def structure_class(kind: str) -> type[StructuredLinear]:
    """The layer class registered under ``kind``; ``StructureError`` lists the names otherwise."""
    try:
        return REGISTRY[kind]
    except KeyError:
        raise StructureError(f"kind={kind!r} is not a registered structure; allowed: {sorted(REGISTRY)}") from None


def spec_params(spec: StructureSpec) -> dict:
    """The constructor arguments of ``spec``: checks required fields are set and no foreign field is."""
    cls = structure_class(spec.kind)
    given = spec.params()
    accepted = (*cls.required, *cls.optional)
    extra = sorted(set(given) - set(accepted))
    if extra:
        raise StructureError(f"{spec.kind}: field(s) {extra} do not apply; "
                             f"{spec.kind} takes {list(accepted) or 'no fields'}")
    missing = [f for f in cls.required if f not in given]
    if missing:
        raise StructureError(f"{spec.kind}: required field(s) {missing} are not set")
    return given


def example_spec(kind: str) -> StructureSpec:
    """The example spec of structure ``kind`` (its class's ``example``): what tests and benchmarks build."""
    return StructureSpec(kind, **structure_class(kind).example)


def build_linear(spec: StructureSpec, in_features: int, out_features: int) -> StructuredLinear:
    """Construct (uninitialised) the structured layer ``spec`` for an ``in -> out`` projection."""
    return structure_class(spec.kind)(in_features, out_features, **spec_params(spec))


__all__ = ["REGISTRY", "StructureError", "StructuredLinear", "StructuredLinearProtocol", "build_linear",
           "example_spec", "spec_params", "structure_class"]
