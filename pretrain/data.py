"""Token stores, deterministic resumable window sampling, blending and the train/validation split.

A token store (written by ``tools/prepare_data.py``) is a zarr group with a 1-D ``tokens`` array, the
``doc_offsets`` of its documents and the tokenizer in its attributes. Training draws fixed-length windows
``[seq_len + 1]`` (inputs and shifted targets) in a seeded order that is a pure function of the sample
index, so a run resumes exactly from the number of samples it has consumed.
"""

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from pretrain.config import DataConfig, UserError
from pretrain.formats import FORMAT, MEGATRON_TOKENIZER
from pretrain.tokenizer import TextTokenizer, TokenizerError, read_tokenizer, tokenizer_digest

IN_MEMORY_BYTES = 1 << 30
"""Stores up to this size are read into memory once; larger ones are sliced from zarr per window."""


class DataError(UserError):
    """A missing, malformed or inconsistent token store."""


class _Store:
    """What the samplers read from a corpus: its tokens as one flat array cut into documents."""

    path: Path
    num_tokens: int
    doc_offsets: np.ndarray
    tokenizer_model: bytes

    @property
    def tokenizer_digest(self) -> str:
        return tokenizer_digest(self.tokenizer_model)

    def split_point(self, val_fraction: float) -> int:
        """First document boundary at or after ``(1 - val_fraction)`` of the tokens (the val/train cut)."""
        target = int(round((1.0 - val_fraction) * self.num_tokens))
        i = int(np.searchsorted(self.doc_offsets, target))
        cut = int(self.doc_offsets[min(i, len(self.doc_offsets) - 1)])
        if cut <= 0 or cut >= self.num_tokens:  # one huge document: cut inside it
            cut = target
        return cut

    def _use_tokenizer(self, tok: TextTokenizer) -> None:
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id
        self.tokenizer_model, self.tokenizer_kind, self.special_tokens = tok.blob, tok.kind, tok.special_tokens()


class TokenStore(_Store):
    """Read access to one zarr token store."""

    def __init__(self, path: str | Path, field: str = "data.paths[0]"):
        self.path = Path(path)
        hint = f"create it with: python tools/prepare_data.py --out {self.path}"
        if not self.path.exists():
            raise DataError(f"{field}={self.path}: no token store there; {hint} (or give the prefix of a Megatron "
                            f"corpus PREFIX.bin/.idx)")
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
        self.own_tokenizer = True
        self.doc_offsets = np.asarray(offsets[:], dtype=np.int64)
        self._tokens = tokens[:] if tokens.nbytes <= IN_MEMORY_BYTES else tokens
        self.num_tokens = int(tokens.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self._tokens[start:start + length], dtype=np.int64)


class MegatronStore(_Store):
    """A Megatron corpus ``PREFIX.bin`` / ``PREFIX.idx``, read with megatron-core's ``IndexedDataset`` (memory-mapped).

    Its tokens are one contiguous array in the ``.bin``, so a window may cross documents as in a zarr store. The
    format records no tokenizer: it is ``PREFIX.tokenizer/`` when ``tools/prepare_data.py --format megatron`` wrote
    one, else ``data.tokenizer``.
    """

    MAX_ID_SAMPLE = 1 << 24
    """Tokens read (in 16 evenly spaced blocks) to check that the ids fit the tokenizer's vocabulary."""

    def __init__(self, prefix: str, field: str, run_tokenizer: TextTokenizer | None, tokenizer_field: str):
        self.path = Path(prefix)
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                other = ".idx" if suffix == ".bin" else ".bin"
                raise DataError(f"{field}={prefix}: {prefix}{other} has no {prefix}{suffix} beside it; a Megatron "
                                f"corpus is the pair PREFIX.bin and PREFIX.idx (give the prefix)")
        from pretrain.megatron_data import megatron

        try:
            self.dataset = megatron("datasets.indexed_dataset").IndexedDataset(prefix, mmap=True)
        except Exception as e:  # megatron-core asserts on a malformed index
            raise DataError(f"{field}={prefix}: not a Megatron indexed dataset ({type(e).__name__}: {e})") from None
        index = self.dataset.index
        lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
        sequence_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.doc_offsets = sequence_offsets[np.asarray(index.document_indices, dtype=np.int64)]
        self.num_tokens = int(sequence_offsets[-1])
        self._dtype = index.dtype
        self._itemsize = np.dtype(index.dtype).itemsize
        self._base = int(index.sequence_pointers[0]) if len(lengths) else 0
        size = Path(prefix + ".bin").stat().st_size
        last = self._base + int(sequence_offsets[-2]) * self._itemsize if len(lengths) else 0
        if self._base + self.num_tokens * self._itemsize != size or (
                len(lengths) and int(index.sequence_pointers[-1]) != last):
            raise DataError(f"{field}={prefix}: {prefix}.bin ({size} bytes) does not hold the {self.num_tokens} "
                            f"contiguous tokens its .idx describes")
        sidecar = Path(prefix + MEGATRON_TOKENIZER)
        self.own_tokenizer = sidecar.exists()
        if self.own_tokenizer:
            try:
                tok = read_tokenizer(sidecar)
            except TokenizerError as e:
                raise DataError(f"{field}={prefix}: its tokenizer {e}") from None
        elif run_tokenizer is None:
            raise DataError(f"{field}={prefix}: a Megatron corpus records no tokenizer (and there is no {sidecar}); "
                            f"set data.tokenizer to the tokenizer it was made with (a .model/.json file or a "
                            f"directory holding one)")
        else:
            tok = run_tokenizer
        self._use_tokenizer(tok)
        top = self.max_token_id()
        if top >= self.vocab_size:
            which = sidecar if self.own_tokenizer else f"{tokenizer_field}={run_tokenizer.origin}"
            raise DataError(f"{field}={prefix}: token id {top} does not fit the {self.vocab_size}-token vocabulary of "
                            f"{which}; the corpus was made with another tokenizer")

    def max_token_id(self) -> int:
        """The largest token id in (a sample of at most ``MAX_ID_SAMPLE`` tokens of) the corpus."""
        if self.num_tokens == 0:
            return -1
        block = max(1, min(self.num_tokens, self.MAX_ID_SAMPLE) // 16)
        starts = np.unique(np.linspace(0, self.num_tokens - block, 16).astype(np.int64))
        return max(int(self.window(int(s), block).max()) for s in starts)

    def window(self, start: int, length: int) -> np.ndarray:
        raw = self.dataset.bin_reader.read(dtype=self._dtype, count=length, offset=self._base + start * self._itemsize)
        return np.asarray(raw, dtype=np.int64)


def open_store(path: str, field: str, run_tokenizer: TextTokenizer | None = None,
               tokenizer_field: str = "data.tokenizer") -> _Store:
    """A zarr token store, or the Megatron corpus whose prefix (or ``.bin``/``.idx`` file) ``path`` names."""
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    if Path(prefix + ".bin").exists() or Path(prefix + ".idx").exists():
        return MegatronStore(prefix, field, run_tokenizer, tokenizer_field)
    return TokenStore(path, field)


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
    """The train and validation streams of a ``DataConfig``.

    ``samples`` (train, validation) is what the run will draw: the Megatron sampler builds its index for exactly
    that many, as Megatron-LM does; the native sampler needs no such bound.
    """

    def __init__(self, cfg: DataConfig, samples: tuple[int, int] | None = None):
        run_tok = None
        if cfg.tokenizer:
            try:
                run_tok = read_tokenizer(cfg.tokenizer)
            except TokenizerError as e:
                raise DataError(f"data.tokenizer={cfg.tokenizer}: {e}") from None
        self.stores = [open_store(p, f"data.paths[{i}]", run_tok) for i, p in enumerate(cfg.paths)]
        owners = [i for i, s in enumerate(self.stores) if s.own_tokenizer]
        if run_tok is None:  # every store records its tokenizer (a Megatron corpus without one needs data.tokenizer)
            first = self.stores[owners[0]]
            ref_digest, ref_name = first.tokenizer_digest, f"data.paths[{owners[0]}]={first.path}"
            run_tok = TextTokenizer(first.tokenizer_kind, first.tokenizer_model, first.special_tokens.get("eos_token"),
                                    first.special_tokens.get("bos_token"), str(first.path))
        else:
            ref_digest, ref_name = tokenizer_digest(run_tok.blob), f"data.tokenizer={cfg.tokenizer}"
        for i in owners:
            s = self.stores[i]
            if s.tokenizer_digest != ref_digest:
                raise DataError(f"data.paths[{i}]={s.path} uses a different tokenizer than {ref_name}; blended "
                                "stores must share one tokenizer")
        self.vocab_size, self.eos_id = run_tok.vocab_size, run_tok.eos_id
        self.tokenizer_model, self.tokenizer_kind = run_tok.blob, run_tok.kind
        self.special_tokens = run_tok.special_tokens()
        weights = cfg.weights or [1.0] * len(self.stores)
        if cfg.sampler == "megatron":
            from pretrain.megatron_data import megatron_streams

            self.train, self.val = megatron_streams(cfg, self.stores, weights, samples, self.eos_id,
                                                    self.vocab_size)
            return
        train, val = [], []
        for i, s in enumerate(self.stores):
            cut = s.split_point(cfg.val_fraction)
            field = f"data.paths[{i}]"
            train.append(WindowSplit(s, 0, cut, cfg.seq_len, cfg.seed + 7919 * i, True, field))
            val.append(WindowSplit(s, cut, s.num_tokens, cfg.seq_len, cfg.seed, False, field + " (validation)"))
        self.train, self.val = Blend(train, weights), Blend(val, weights)

    def describe(self) -> str:
        parts = [f"{s.path} ({s.num_tokens:,} tokens, {len(s.doc_offsets) - 1:,} docs)" for s in self.stores]
        return "; ".join(parts)


class Prefetcher:
    """A stream's batches drawn one step ahead in a background thread, so reading overlaps the step.

    ``batch(start, count, next_start)`` returns samples ``[start, start + count)`` (prefetched when the previous
    call announced them) and starts drawing ``[next_start, next_start + count)``. The samples are those of
    ``stream.batch`` whatever the timing, so prefetching changes no result. ``load_s`` is the time the last batch
    took to draw, ``wait_s`` the time the caller waited for it.
    """

    def __init__(self, stream, enabled: bool = True):
        self.stream = stream
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._ahead = None
        self.load_s = self.wait_s = 0.0

    def _draw(self, start: int, count: int):
        began = time.perf_counter()
        out = self.stream.batch(start, count)
        return out, time.perf_counter() - began

    def batch(self, start: int, count: int, next_start: int | None = None):
        began = time.perf_counter()
        if self._ahead is not None and self._ahead[0] == (start, count):
            out, self.load_s = self._ahead[1].result()
        else:
            out, self.load_s = self._draw(start, count)
        self.wait_s = time.perf_counter() - began
        self._ahead = None
        if self._pool is not None and next_start is not None:
            self._ahead = ((next_start, count), self._pool.submit(self._draw, next_start, count))
        return out
