"""Llama-style structured GPT: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Every projection (q, k, v, o, up, gate, down) is built by the structured registry from its own spec.
The forward tolerates a missing embedding, final norm or head, so a pipeline stage is this model with
modules deleted and parameter names stay stable. Local head counts are read off the projections' output
sizes, so a tensor-parallel shard of q/k/v runs the same code.
"""

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SLOTS, ModelConfig
from model.structured import StructuredLinear, StructureError, build_linear
from model.structured.base import normal_rows


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[max_seq_len, head_dim]`` (frequencies repeated over both halves)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, hd]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[B, nh, T, hd]`` by position (the rotate-half convention of Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _build(cfg: ModelConfig, proj: str) -> StructuredLinear:
    out_features, in_features = cfg.projection_shape(proj)
    try:
        return build_linear(cfg.spec_for(proj), in_features, out_features)
    except StructureError as e:
        raise StructureError(f"model.structure ({proj} projection, in={in_features}, out={out_features}): "
                             f"{e}") from None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of ``logits[B, T, V]`` (computed in fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = _build(cfg, "q")
        self.k = _build(cfg, "k")
        self.v = _build(cfg, "v")
        self.o = _build(cfg, "o")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, hd = x.shape[0], self.head_dim
        q, k, v = self.q(x), self.k(x), self.v(x)
        seq = q.shape[1]  # the whole sequence, also when x holds a sequence-parallel shard of it
        if seq > cos.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={cos.shape[0]}")
        q = q.view(bsz, seq, -1, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(bsz, seq, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(bsz, seq, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = cos[:seq], sin[:seq]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        y = y.transpose(1, 2).reshape(bsz, seq, -1)  # (B, T, nh*hd)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = _build(cfg, "gate")
        self.up = _build(cfg, "up")
        self.down = _build(cfg, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [B, T, d_ff] -> [B, T, d]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.runner: Callable | None = None
        """How ``forward`` runs ``body``: ``runner(body, x, cos, sin)``; ``parallel/blocks.py`` sets it for activation
        checkpointing. None: directly."""

    def projections(self):
        """``(slot name, parent module, layer)`` of every structured projection, in ``SLOTS`` order."""
        for name, slot in SLOTS.items():
            parent = getattr(self, slot.group)
            yield name, parent, getattr(parent, name)

    def forward(self, x, cos, sin):
        if self.runner is None:
            return self.body(x, cos, sin)
        return self.runner(self.body, x, cos, sin)

    def body(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only language model over structured projections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.loss_fn = cross_entropy  # tensor parallelism swaps in the vocab-parallel loss
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- init -----------------------------------------------------------------------------------------
    def init_order(self) -> list[tuple[str, float]]:
        """The modules ``init_weights`` draws from the generator, in drawing order, with their std: the token
        embedding, every projection block by block in ``SLOTS`` order, the output head when untied. Residual-output
        projections (``SLOTS``: o, down) are scaled by ``1/sqrt(2 n_layers)`` (GPT-2). A sharded initialisation
        (``parallel/init.py``) walks the same list, so each rank draws what a full init draws."""
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        order = [("tok_embeddings", cfg.init_std)]
        for i in range(cfg.n_layers):
            order += [(f"layers.{i}.{slot.group}.{name}", resid_std if slot.residual else cfg.init_std)
                      for name, slot in SLOTS.items()]
        if not cfg.tie_embeddings:
            order.append(("output", cfg.init_std))
        return order

    @torch.no_grad()
    def init_fixed(self) -> None:
        """What init draws nothing for: the RoPE tables, the norms (ones) and the tied head. Works on any part of the
        model (a pipeline stage, a tensor-parallel shard)."""
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight  # to_empty() from meta unties shared parameters
        cos, sin = rope_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for mod in self.modules():
            if isinstance(mod, nn.RMSNorm):
                mod.weight.fill_(1.0)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every weight from one seed, drawn on CPU over the full tensors in ``init_order``.

        Works after ``to_empty`` from the meta device; also rebuilds the RoPE tables.
        """
        gen = torch.Generator().manual_seed(seed)
        self.init_fixed()
        for name, std in self.init_order():
            unit = self.get_submodule(name)
            if isinstance(unit, StructuredLinear):
                unit.reset_parameters(std, gen)
            else:  # embedding or head [V, d]
                rows, cols = unit.weight.shape
                normal_rows(rows, cols, std, gen, range(rows), out=unit.weight.data)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]``, or the mean cross-entropy when ``targets`` is given.

        ``tokens`` is ``[B, T]`` token ids, or hidden states ``[B, T, d]`` when this module has no embedding.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # [B, T, d]
        for block in self.layers.values():
            h = block(h, self.rope_cos, self.rope_sin)  # attention takes the first T rows of the tables
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        logits = self.output(h)  # [B, T, V] (or this rank's vocab slice under tensor parallelism)
        if targets is None:
            return logits
        return self.loss_fn(logits, targets)

    # -- accounting -----------------------------------------------------------------------------------
    def structured_layers(self) -> dict[str, StructuredLinear]:
        """Every structured projection by qualified name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, StructuredLinear)}

    def num_params(self, exclude_embedding: bool = False, counts: Mapping | None = None) -> int:
        """Effective parameter count: structured layers count their own (non-zeros for sparse kinds).

        ``counts`` (projection name -> an object with the layer's ``num_params``, ``flops`` and ``executed_flops``)
        replaces the projections' own counts: a sharded initialisation keeps the full layers' counts, not the
        layers (``parallel.init.LayerCount``)."""
        structured = self.structured_layers()
        inside = {id(p) for m in structured.values() for p in m.parameters()}
        total = sum(m.num_params() for m in (counts or structured).values())
        total += sum(p.numel() for p in self.parameters() if id(p) not in inside)
        if exclude_embedding and self.tok_embeddings is not None:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int, counts: Mapping | None = None) -> dict[str, int]:
        """Exact forward FLOPs per token at sequence length ``seq_len``, and training (3x forward).

        Projections report their own counts; causal attention scores and the value mix cost
        ``4 * d_attn * (T + 1) / 2`` per token and layer; the head ``2 d V``. ``executed`` and ``executed_train``
        count what the products run here execute, zeros included (a sparse kind without a sparse kernel runs a
        dense product): MFU on ``train`` credits the structure, on ``executed_train`` the hardware's work.
        ``counts``: as in ``num_params``.
        """
        cfg = self.cfg
        layers = (counts or self.structured_layers()).values()
        proj = sum(m.flops(1) for m in layers)
        executed = sum(m.executed_flops(1) for m in layers)
        attn = 0
        for block in self.layers.values():
            d_attn = block.attn.q.out_features
            attn += 4 * d_attn * (seq_len + 1) // 2
        head = 2 * cfg.d_model * cfg.vocab_size if self.output is not None else 0
        forward = proj + attn + head
        executed += attn + head
        return {"projections": proj, "attention": attn, "head": head, "forward": forward, "train": 3 * forward,
                "executed": executed, "executed_train": 3 * executed}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups by ``role``: ``matrix`` (projections), ``embedding`` (token embedding and output
        head) and ``norm`` (no weight decay). Empty groups are left out."""
        ids = {"norm": {id(p) for m in self.modules() if isinstance(m, nn.RMSNorm) for p in m.parameters()},
               "embedding": {id(p) for m in (self.tok_embeddings, self.output) if m is not None
                             for p in m.parameters()}}
        groups = {role: [] for role in ("matrix", "embedding", "norm")}
        for p in self.parameters():
            if p.requires_grad:
                role = next((r for r, s in ids.items() if id(p) in s), "matrix")
                groups[role].append(p)
        return [{"params": ps, "weight_decay": 0.0 if role == "norm" else weight_decay, "role": role}
                for role, ps in groups.items() if ps]
