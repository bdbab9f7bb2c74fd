"""A structorch model with its structured projections kept (Hugging Face remote code).

Hugging Face's Llama (attention, RoPE, KV cache, ``generate``) with every projection replaced by a
``StructuredProjection`` holding exactly the tensors structorch trained: low-rank factors, block-diagonal,
Monarch and BLAST factors, and the kept values of sparse projections (N:M, block-sparse, pruned dense, the sparse
part of sparse plus low-rank) with their flat positions as a buffer. The parameter count is structorch's.
Self-contained: torch and transformers only.

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_structorch import StructorchConfig

GROUPS = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn", "gate": "mlp", "up": "mlp",
          "down": "mlp"}


class StructuredProjection(nn.Module):
    """``y = x W^T`` for one structured ``W[out, in]``, from its stored tensors (``spec``: kind, in, out, shapes,
    hyper-parameters)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.kind, self.in_features, self.out_features = spec["kind"], spec["in"], spec["out"]
        self.hparams = dict(spec.get("hparams", {}))
        for name, shape in spec["params"].items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        for name, shape in spec.get("buffers", {}).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long))

    def _sparse(self) -> torch.Tensor:
        flat = self.values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.indices,), self.values).view(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` matrix (for the kinds whose product is not written out below)."""
        out, inp = self.out_features, self.in_features
        if self.kind == "blockdiag":
            dense = torch.block_diag(*self.weight.unbind(0))
            if self.hparams.get("shuffle"):
                nb = self.weight.shape[0]
                dense = dense.t().unflatten(-1, (nb, -1)).transpose(-1, -2).flatten(-2).t()
            return dense
        if self.kind == "monarch":
            nb, c = self.hparams["blocks"], self.hparams["rank"]
            left = self.l.reshape(nb, out // nb, nb, c)
            right = self.r.reshape(nb, c, nb, inp // nb)
            sub = torch.einsum("lskt,ktlp->lksp", left, right)
            return sub.permute(0, 2, 1, 3).reshape(out, inp)
        if self.kind == "blast":
            blocks = torch.einsum("ipr,ijr,jqr->ijpq", self.u, self.s, self.v)
            return blocks.permute(0, 2, 1, 3).reshape(out, inp)
        if self.kind == "sparse":
            return self._sparse()
        raise ValueError(f"unknown structure kind {self.kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return F.linear(x, self.weight)
        if self.kind == "lowrank":
            return F.linear(F.linear(x, self.v), self.u)
        if self.kind == "sparse_lowrank":
            return F.linear(F.linear(x, self.v) * self.hparams["scale"], self.u) + F.linear(x, self._sparse())
        return F.linear(x, self.dense_weight())


class StructorchForCausalLM(LlamaForCausalLM):
    config_class = StructorchConfig

    def __init__(self, config: StructorchConfig):
        super().__init__(config)
        for name, spec in config.structures.items():
            _, layer, _, slot = name.split(".")
            parent = getattr(self.model.layers[int(layer)], GROUPS[slot])
            setattr(parent, f"{slot}_proj", StructuredProjection(spec))
        self.post_init()

    def _init_weights(self, module):
        if not isinstance(module, StructuredProjection):  # loaded from the checkpoint, never initialised
            super()._init_weights(module)
