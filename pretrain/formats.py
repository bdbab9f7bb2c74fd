"""On-disk names shared by the writer of token stores (``tools/prepare_data.py``) and their reader
(``pretrain/data.py``), in a module without heavy imports so that the tokenizing workers start light."""

FORMAT = "structorch-tokens-v1"
"""The ``format`` attribute of a zarr token store."""
MEGATRON_TOKENIZER = ".tokenizer"
"""``PREFIX.tokenizer/`` beside a Megatron corpus ``PREFIX.bin/.idx``: its tokenizer, when prepare_data wrote it."""
