"""How each transformer block runs: activation checkpointing and ``torch.compile``, per block (TorchTitan's
``apply_ac`` and ``apply_compile``), on any stage of any topology.

- ``full``: a block keeps only its input; its whole forward runs again in the backward.
- ``selective``: a block keeps the outputs of its matrix products and of attention (``SAVED_OPS``) and
  recomputes everything else: norms, RoPE, SiLU and the gating product, residual adds, masks, the BLAST
  coupling and the structures' other elementwise steps. Those are cheap to recompute and, for the structured
  projections, the products' outputs are the small compressed intermediates (``[..., r]``, ``[..., b, r]``).

Recomputation is exact: the same ops on the same inputs, so losses equal those of ``none`` bit for bit.
A block's tensor-parallel collectives run again in its recomputation, on every rank in the same order.
"""

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.gpt import GPT

MODES = ("none", "full", "selective")

aten = torch.ops.aten
SAVED_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
}
"""Ops whose outputs ``selective`` keeps: the matrix products and attention."""


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def _run_checkpointed(mode: str, body, x, cos, sin):
    if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
        return body(x, cos, sin)
    if mode == "selective":
        return checkpoint(body, x, cos, sin, use_reentrant=False, context_fn=_selective_context)
    return checkpoint(body, x, cos, sin, use_reentrant=False)


def apply_activation_checkpointing(model: GPT, mode: str) -> None:
    """Checkpoint every block of ``model`` (a stage holds only its own blocks)."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r}; allowed: {', '.join(MODES)}")
    for block in model.layers.values():
        block.runner = None if mode == "none" else partial(_run_checkpointed, mode)


def compile_blocks(model: GPT, backend: str = "inductor") -> None:
    """``torch.compile`` every block of ``model`` in place (parameter names do not change). The Triton kernels
    are torch custom ops (``structorch::*``), so they sit inside the compiled graphs; a checkpointed block is
    compiled with its recomputation."""
    for block in model.layers.values():
        block.compile(backend=backend)
