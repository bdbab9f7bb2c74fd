"""Token stores, deterministic resumable window sampling, blending and the train/validation split.

A token store (written by ``tools/prepare_data.py``) is a zarr group with a 1-D ``tokens`` array, the
``doc_offsets`` of its documents and the tokenizer in its attributes. Training draws fixed-length windows
``[seq_len + 1]`` (inputs and shifted targets) in a seeded order that is a pure function of the sample
index, so a run resumes exactly from the number of samples it has consumed.
"""

import base64
import hashlib
from pathlib import Path

import numpy as np
import torch
import zarr

from pretrain.config import DataConfig, UserError

FORMAT = "structorch-tokens-v1"
IN_MEMORY_BYTES = 1 << 30
"""Stores up to this size are read into memory once; larger ones are sliced from zarr per window."""


class DataError(UserError):
    """A missing, malformed or inconsistent token store."""


class TokenStore:
    """Read access to one token store."""

    def __init__(self, path: str | Path, field: str = "data.paths[0]"):
        self.path = Path(path)
        hint = f"create it with: python tools/prepare_data.py --out {self.path}"
        if not self.path.exists():
            raise DataError(f"{field}={self.path}: no token store there; {hint}")
        try:
            group = zarr.open_group(str(self.path), mode="r")
            attrs = dict(group.attrs)
            tokens, offsets = group["tokens"], group["doc_offsets"]
        except Exception as e:  # zarr raises several types for a directory that is not a group
            raise DataError(f"{field}={self.path}: not a token store ({type(e).__name__}: {e}); {hint}") from None
        if attrs.get("format") != FORMAT:
            raise DataError(f"{field}={self.path}: format {attrs.get('format')!r} is not {FORMAT!r}; {hint}")
        self.attrs = attrs
        self.vocab_size = int(attrs["vocab_size"])
        self.eos_id = int(attrs["eos_id"])
        self.tokenizer_model = base64.b64decode(attrs["tokenizer_model"])
        self.tokenizer_kind = attrs.get("tokenizer_kind", "sentencepiece")
        self.special_tokens = {k: attrs[k] for k in ("eos_token", "bos_token") if k in attrs}
        self.doc_offsets = np.asarray(offsets[:], dtype=np.int64)
        self._tokens = tokens[:] if tokens.nbytes <= IN_MEMORY_BYTES else tokens
        self.num_tokens = int(tokens.shape[0])

    @property
    def tokenizer_digest(self) -> str:
        return hashlib.sha256(self.tokenizer_model).hexdigest()[:16]

    def split_point(self, val_fraction: float) -> int:
        """First document boundary at or after ``(1 - val_fraction)`` of the tokens (the val/train cut)."""
        target = int(round((1.0 - val_fraction) * self.num_tokens))
        i = int(np.searchsorted(self.doc_offsets, target))
        cut = int(self.doc_offsets[min(i, len(self.doc_offsets) - 1)])
        if cut <= 0 or cut >= self.num_tokens:  # one huge document: cut inside it
            cut = target
        return cut

    def window(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self._tokens[start:start + length], dtype=np.int64)


class WindowSplit:
    """Non-overlapping windows of ``seq_len + 1`` tokens from ``[lo, hi)`` of a store, in a seeded order.

    Sample ``i`` is window ``perm_e[i % n]`` of epoch ``e = i // n``; each epoch has its own permutation.
    """

    def __init__(self, store: TokenStore, lo: int, hi: int, seq_len: int, seed: int, shuffle: bool, field: str):
        self.store, self.lo, self.seq_len, self.seed, self.shuffle = store, lo, seq_len, seed, shuffle
        self.n = (hi - lo - 1) // seq_len
        if self.n <= 0:
            raise DataError(f"{field}={store.path}: {hi - lo} tokens cannot fill one window of data.seq_len="
                            f"{seq_len} + 1; use a larger corpus, a smaller seq_len or another val_fraction")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def __getitem__(self, i: int) -> np.ndarray:
        epoch, j = divmod(int(i), self.n)
        k = int(self._perm(epoch)[j])
        return self.store.window(self.lo + k * self.seq_len, self.seq_len + 1)


class Blend:
    """Several window splits mixed by weight; sample ``i`` is a deterministic function of ``i``.

    Sample ``i`` goes to the source whose share lags its weight most (``argmax w_k (i + 1) - count_k``), so
    every prefix of the stream matches the weights as closely as integers allow.
    """

    def __init__(self, sources: list[WindowSplit], weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        self.sources, self.weights = sources, w / w.sum()
        self._source = np.zeros(0, dtype=np.int64)
        self._index = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(len(sources), dtype=np.int64)

    def _extend(self, upto: int) -> None:
        have = len(self._source)
        if upto <= have:
            return
        upto = max(upto, 2 * have, 1024)
        if len(self.sources) == 1:
            self._source = np.zeros(upto, dtype=np.int64)
            self._index = np.arange(upto, dtype=np.int64)
            return
        src = np.empty(upto - have, dtype=np.int64)
        idx = np.empty(upto - have, dtype=np.int64)
        counts = self._counts
        for n, i in enumerate(range(have, upto)):
            k = int(np.argmax(self.weights * (i + 1) - counts))
            src[n], idx[n] = k, counts[k]
            counts[k] += 1
        self._source = np.concatenate([self._source, src])
        self._index = np.concatenate([self._index, idx])

    def sample(self, i: int) -> np.ndarray:
        self._extend(i + 1)
        return self.sources[int(self._source[i])][int(self._index[i])]

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``[start, start + count)`` as ``(inputs, targets)``, each ``[count, seq_len]``."""
        rows = np.stack([self.sample(i) for i in range(start, start + count)])  # [count, T + 1]
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class Corpus:
    """The train and validation streams of a ``DataConfig``."""

    def __init__(self, cfg: DataConfig):
        self.stores = [TokenStore(p, f"data.paths[{i}]") for i, p in enumerate(cfg.paths)]
        first = self.stores[0]
        for i, s in enumerate(self.stores[1:], start=1):
            if s.tokenizer_digest != first.tokenizer_digest:
                raise DataError(f"data.paths[{i}]={s.path} uses a different tokenizer than data.paths[0]="
                                f"{first.path}; blended stores must share one tokenizer")
        weights = cfg.weights or [1.0] * len(self.stores)
        train, val = [], []
        for i, s in enumerate(self.stores):
            cut = s.split_point(cfg.val_fraction)
            field = f"data.paths[{i}]"
            train.append(WindowSplit(s, 0, cut, cfg.seq_len, cfg.seed + 7919 * i, True, field))
            val.append(WindowSplit(s, cut, s.num_tokens, cfg.seq_len, cfg.seed, False, field + " (validation)"))
        self.train, self.val = Blend(train, weights), Blend(val, weights)
        self.vocab_size = first.vocab_size
        self.tokenizer_model = first.tokenizer_model
        self.tokenizer_kind, self.special_tokens = first.tokenizer_kind, first.special_tokens

    def describe(self) -> str:
        parts = [f"{s.path} ({s.num_tokens:,} tokens, {len(s.doc_offsets) - 1:,} docs)" for s in self.stores]
        return "; ".join(parts)
