"""``data.sampler: megatron``: Megatron-LM's sample order, built by megatron-core itself.

The train and validation streams are megatron-core's ``GPTDataset`` (one per corpus) blended by
``BlendedMegatronDatasetBuilder`` exactly as ``pretrain_gpt.py`` builds them from ``--data-path w1 p1 w2 p2``,
``--split`` and ``--seed``: documents split by the ``split`` proportions, shuffled and packed into sequences of
``seq_len + 1`` tokens that cross document boundaries, sequences shuffled, corpora blended by weight. A run moved
from Megatron-LM with the same corpora, seed, sequence length and sample counts sees the same samples in the same
order. The index is built for exactly the samples the run will draw (``train.steps x train.global_batch`` and the
validation batches), as Megatron-LM does, so resuming at any sample is exact.

Two megatron-core pitfalls are guarded here with clear errors instead of a hang or a crash:

- a split with zero documents but a requested size makes ``GPTDataset._get_num_epochs`` loop forever;
- ``BlendedDataset`` calls ``torch.distributed.get_rank()`` when it caches its index, which needs a process
  group even on one process: no cache path is given, so that branch is never taken (tested without one).
"""

import importlib
import logging
import warnings

import numpy as np
import torch

from pretrain.config import DataConfig, UserError


def megatron(module: str):
    """A megatron-core module, imported without its warnings about the GPU libraries (Transformer Engine, Apex)
    that the dataset code does not use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(f"megatron.core.{module}")
    logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)  # "cannot save ... path_to_cache is None"
    return mod


class _Tokenizer:
    """The two ids megatron-core's ``GPTDataset`` reads from its tokenizer (it tokenizes nothing itself)."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.vocab_size = eod, vocab_size
        self.unique_identifiers = {"class": "structorch", "eod": eod, "vocab_size": vocab_size}  # in the index hash

    @property
    def pad(self) -> int:  # no pad token: megatron-core then uses its own id, outside the vocabulary
        raise AttributeError("pad")


class MegatronStream:
    """Samples ``[start, start + count)`` of a megatron-core dataset as ``(inputs, targets)``."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + count > len(self.dataset):
            raise UserError(f"data.sampler=megatron: the {self.name} index holds {len(self.dataset)} samples and "
                            f"sample {start + count - 1} was asked for; the index is built for train.steps x "
                            f"train.global_batch samples: rebuild it with the run's settings")
        rows = [self.dataset[i] for i in range(start, start + count)]
        return torch.stack([r["tokens"] for r in rows]), torch.stack([r["labels"] for r in rows])


def split_string(val_fraction: float) -> str:
    """Megatron's ``--split`` for our ``data.val_fraction``: train, validation, no test."""
    return f"{1.0 - val_fraction:.6f},{val_fraction:.6f},0"


def _check_splits(stores, val_fraction: float, sizes: list[int]) -> None:
    """Each corpus's train and validation splits must hold a document (megatron-core loops forever otherwise)."""
    cfg = megatron("datasets.blended_megatron_dataset_config")
    matrix = cfg.convert_split_vector_to_split_matrix(cfg.parse_and_normalize_split(split_string(val_fraction)))
    for i, store in enumerate(stores):
        docs = len(store.doc_offsets) - 1
        for (name, size), bounds in zip((("train", sizes[0]), ("validation", sizes[1])), matrix):
            if bounds is None or not size:
                continue
            beg, end = (int(round(b * float(docs))) for b in bounds)
            if end <= beg:
                raise UserError(f"data.paths[{i}]={store.path}: its {name} split gets 0 of its {docs} documents at "
                                f"data.val_fraction={val_fraction} (Megatron splits by documents), and megatron-core "
                                f"would loop forever; use a larger corpus or another data.val_fraction")


def megatron_streams(cfg: DataConfig, stores, weights: list[float], samples: tuple[int, int] | None, eos_id: int,
                     vocab_size: int):
    """The (train, validation) ``MegatronStream`` of ``stores`` (all Megatron corpora)."""
    from pretrain.data import MegatronStore

    zarr_stores = [f"data.paths[{i}]={s.path}" for i, s in enumerate(stores) if not isinstance(s, MegatronStore)]
    if zarr_stores:
        raise UserError(f"data.sampler=megatron reads Megatron corpora only, and {zarr_stores[0]} is a zarr token "
                        "store: write it as one with tools/prepare_data.py --format megatron, or use "
                        "data.sampler=native")
    if samples is None:
        raise UserError("data.sampler=megatron needs the run's sample counts (train.steps x train.global_batch)")
    builder, gpt = megatron("datasets.blended_megatron_dataset_builder"), megatron("datasets.gpt_dataset")

    sizes = [int(samples[0]), int(samples[1]), 0]
    _check_splits(stores, cfg.val_fraction, sizes)
    prefixes = [str(s.path) for s in stores]
    blend = (prefixes, None) if len(prefixes) == 1 else (prefixes, [float(w) for w in np.asarray(weights)])
    config = gpt.GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.seq_len, blend=blend, split=split_string(cfg.val_fraction),
        path_to_cache=None, tokenizer=_Tokenizer(eos_id, vocab_size), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, mmap_bin_files=True)
    train, val, _ = builder.BlendedMegatronDatasetBuilder(gpt.GPTDataset, sizes, lambda: True, config).build()
    return MegatronStream(train, "train"), MegatronStream(val, "validation")
