"""Configuration of a structorch model exported with its structures (Hugging Face remote code).

A Llama configuration plus ``structures``: for every projection (``layers.<i>.<attn|mlp>.<q|k|v|o|gate|up|down>``)
its kind, the shapes of its stored tensors and the hyper-parameters its forward needs. Self-contained: torch and
transformers only.
"""

from transformers import LlamaConfig


class StructorchConfig(LlamaConfig):
    model_type = "structorch"

    def __init__(self, structures: dict | None = None, **kwargs):
        self.structures = structures or {}
        super().__init__(**kwargs)
