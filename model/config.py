"""Model configuration: the architecture and the structure of every projection.

Only architecture lives here; parallel topology and training settings live in ``pretrain.config``.
"""

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Slot:
    """The role of one structured projection of a transformer block."""

    group: str
    """``attn`` or ``mlp``: the block's sub-module that holds it, and the structure key that covers it."""
    style: str
    """Tensor-parallel split: ``column`` (outputs split; heads, MLP hidden) or ``row`` (inputs split)."""
    residual: bool
    """Writes into the residual stream: its init std is scaled by ``1/sqrt(2 n_layers)`` (GPT-2)."""


SLOTS: dict[str, Slot] = {
    "q": Slot("attn", "column", False),
    "k": Slot("attn", "column", False),
    "v": Slot("attn", "column", False),
    "o": Slot("attn", "row", True),
    "gate": Slot("mlp", "column", False),
    "up": Slot("mlp", "column", False),
    "down": Slot("mlp", "row", True),
}
"""Every structured projection of a block by its name in the model, in initialisation order. The model's init,
tensor parallelism and the exporters read this table (Hugging Face's ``base_model_tp_plan`` as data)."""

PROJECTIONS = tuple(SLOTS)
PROJECTION_GROUPS = {g: tuple(n for n, s in SLOTS.items() if s.group == g) for g in ("attn", "mlp")}
STRUCTURE_KEYS = ("default", *PROJECTION_GROUPS, *PROJECTIONS)
"""The keys that select projections (``model.structure``, ``sparsity.rules[].select``), least specific first."""


def key_covers(key: str, proj: str) -> bool:
    """Whether a structure/sparsity key (``default``, a group or a projection name) covers projection ``proj``."""
    return key in ("default", proj) or proj in PROJECTION_GROUPS.get(key, ())


@dataclass
class StructureSpec:
    """Which structured linear layer a projection uses, and its hyper-parameters.

    Only the fields that ``kind`` uses may be set; the registry rejects the others by name.
    """

    kind: str = "dense"
    """Registered structure name: dense, lowrank, blockdiag, monarch, blast, blocksparse, nm, sparse_lowrank."""
    rank: int | None = None
    """lowrank/blast/sparse_lowrank: rank r of the factors; monarch: rank of each block pair (default 1)."""
    blocks: int | None = None
    """blockdiag/monarch/blast: number of blocks per dimension."""
    block_size: int | None = None
    """blocksparse: side of the square blocks the mask keeps or drops."""
    density: float | None = None
    """blocksparse/sparse_lowrank: fraction of (block) entries kept, in (0, 1]."""
    n: int | None = None
    """nm: entries kept in every group of m."""
    m: int | None = None
    """nm: group size along the input dimension."""
    shuffle: bool | None = None
    """blockdiag: interleave output channels across blocks (channel shuffle), so stacked layers mix blocks."""
    decay: float | None = None
    """nm: SR-STE decay applied to pruned weights in the backward pass."""
    init: str | None = None
    """sparse_lowrank: ``variance`` (default: matches a dense layer's output variance) or ``sltrain`` (SLTrain's
    init: U = 0, V and the sparse values uniform in +-1/sqrt(in), the low-rank product scaled by alpha / r)."""
    alpha: float | None = None
    """sparse_lowrank with init sltrain: the alpha of the alpha / r scale (default 32, SLTrain's)."""

    def flow(self) -> str:
        """The spec as a one-line YAML mapping, e.g. ``{kind: lowrank, rank: 8}`` (for ``--set`` overrides)."""
        return "{" + ", ".join(f"{k}: {v}" for k, v in {"kind": self.kind, **self.params()}.items()) + "}"

    def params(self) -> dict:
        """The hyper-parameters that are set, without ``kind``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kind"
                and getattr(self, f.name) is not None}


def _dense() -> dict[str, StructureSpec]:
    return {"default": StructureSpec()}


@dataclass
class ModelConfig:
    """Llama-style decoder architecture."""

    vocab_size: int | None = None
    """Vocabulary size; None takes it from the token store's tokenizer (the resolved config records it)."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads. Must divide n_heads."""
    d_ff: int = 688
    """Hidden width of the SwiGLU MLP."""
    max_seq_len: int = 256
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    init_std: float = 0.02
    """Std of a dense projection at init; every structure matches the output variance of that dense layer."""
    structure: dict[str, StructureSpec] = field(default_factory=_dense)
    """Structure per projection. Keys: ``default``, a group (``attn``, ``mlp``) or a projection
    (``q, k, v, o, up, gate, down``); the most specific key wins."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of projection ``proj``."""
        d, hd = self.d_model, self.head_dim
        return {"q": (self.n_heads * hd, d), "k": (self.kv_heads * hd, d), "v": (self.kv_heads * hd, d),
                "o": (d, self.n_heads * hd), "gate": (self.d_ff, d), "up": (self.d_ff, d),
                "down": (d, self.d_ff)}[proj]

    def spec_for(self, proj: str) -> StructureSpec:
        """Resolve the structure of projection ``proj`` (most specific key wins)."""
        group = next(g for g, members in PROJECTION_GROUPS.items() if proj in members)
        for key in (proj, group, "default"):
            if key in self.structure:
                return self.structure[key]
        return StructureSpec()

    def validate(self, require_vocab: bool = True) -> None:
        """Raise ``ValueError`` naming the field when the architecture is inconsistent.

        ``require_vocab=False`` accepts ``vocab_size=None`` (filled in later from the token store).
        """
        for key in self.structure:
            if key not in STRUCTURE_KEYS:
                raise ValueError(f"model.structure.{key}: unknown projection key; allowed: {sorted(STRUCTURE_KEYS)}")
        if self.vocab_size is None and require_vocab:
            raise ValueError("model.vocab_size is not set (the trainer fills it from the token store)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={self.vocab_size} must be a positive integer")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}; "
                             f"allowed: {divisors(self.d_model)}")
        if self.head_dim % 2:
            raise ValueError(f"model.d_model / model.n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}; "
                             f"allowed: {divisors(self.n_heads)}")


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` (used in error messages that list the allowed values)."""
    return [d for d in range(1, n + 1) if n % d == 0]
