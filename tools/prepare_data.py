"""Prepare a token store: raw text -> tokenizer -> a zarr token store or a Megatron ``.bin/.idx`` corpus.

Usage:
    python tools/prepare_data.py --out data/stdlib                       # Python standard library sources
    python tools/prepare_data.py --out data/mine --input corpus/ notes.jsonl --vocab-size 8192
    python tools/prepare_data.py --out data/wiki --dataset wikitext --dataset-config wikitext-2-raw-v1 --streaming
    python tools/prepare_data.py --out data/b --input more/ --tokenizer data/stdlib/tokenizer.model
    python tools/prepare_data.py --out data/c --input more/ --tokenizer path/to/hf-model   # its tokenizer
    python tools/prepare_data.py --out data/mega/stdlib --format megatron   # data/mega/stdlib.{bin,idx}

Sources: ``--input`` files or directories (.txt/.md/.py/.rst read as one document per file, .json/.jsonl/
.parquet rows with a ``--text-field``), a Hugging Face ``--dataset`` (a hub name or a local dataset directory;
``--streaming`` reads it without downloading it whole), or by default the ``.py`` sources of the running
interpreter's standard library (real text present on every machine, nothing downloaded). Every source is read as
a ``datasets`` stream, so memory stays bounded whatever the corpus size:

1. documents are shuffled with ``--seed`` (the order of files and a ``--shuffle-buffer`` of documents);
2. a new tokenizer trains on a seeded reservoir sample of at most ``--tokenizer-sentences`` lines;
3. documents are cut into chunks of about ``--chunk-mb`` of text, tokenized by ``--num-proc`` processes (a bounded
   number of chunks in flight), each chunk saved under ``OUT.partial/`` as soon as it is done;
4. the chunks are joined, in order, into the store, which is renamed into place.

The same inputs, seed and settings give a byte-identical store, whatever ``--num-proc``. An interrupted run
resumes from ``OUT.partial/`` (its settings must match; ``--overwrite`` starts over). An existing ``--out`` is
never replaced without ``--overwrite``.
"""

import argparse
import base64
import json
import multiprocessing
import os
import random
import shutil
import sys
import sysconfig
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece as spm
import zarr
from tqdm import tqdm

from pretrain.formats import FORMAT, MEGATRON_TOKENIZER
from pretrain.tokenizer import TextTokenizer, TokenizerError, read_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FORMATS = ("zarr", "megatron")
CHUNK = 1 << 16
"""Tokens per zarr chunk of a written store: a training window reads (and decompresses) one or two chunks, so small
chunks keep stores too large for memory fast to sample (measured: 64 Ki tokens draw 3.3x the samples/s of 1 Mi)."""
SETTINGS = ("input", "dataset", "dataset_config", "split", "text_field", "tokenizer", "vocab_size", "max_docs",
            "seed", "tokenizer_sentences", "tokenizer_threads", "shuffle_buffer", "chunk_mb", "format")
"""The flags that decide a store's contents: a resumed run must match them (``--num-proc`` does not count)."""


class PrepareError(Exception):
    """A bad flag or input: reported as ``error: ...`` with exit code 2."""


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files (without site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | set(TABLE_BUILDERS))
        elif p.is_file():
            files.append(p)
        else:
            raise PrepareError(f"--input {item}: no such file or directory")
    if not files:
        raise PrepareError(f"--input {' '.join(inputs)}: no .txt/.md/.py/.rst/.json/.jsonl/.parquet files found")
    return files


def _text_column(ds, field: str, where: str):
    names = ds.column_names
    if names is not None and field not in names:
        raise PrepareError(f"--text-field {field!r} is not a column of {where}; columns: {names}")
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def read_text_files(paths: list[str]):
    """One document per text file (undecodable bytes replaced)."""
    for path in paths:
        yield {"text": Path(path).read_text(encoding="utf-8", errors="replace")}


def open_documents(args):
    """The documents as one ``datasets.IterableDataset`` with a ``text`` column, shuffled by ``--seed``, and the
    number of documents when it is known without reading them (for the progress bar's ETA)."""
    import datasets

    datasets.disable_caching()
    if args.dataset:
        try:
            ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=args.streaming)
        except (FileNotFoundError, ValueError) as e:
            raise PrepareError(f"--dataset {args.dataset}: {e}") from None
        total = None
        if not args.streaming:
            total = len(ds)
            ds = ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds))))
        ds = _text_column(ds, args.text_field, f"--dataset {args.dataset}")
    else:
        files = _expand(args.input) if args.input else stdlib_files()
        parts = []
        text_files = [str(f) for f in files if f.suffix not in TABLE_BUILDERS]
        if text_files:  # one shard per file, as the "text" builder makes them, without its per-file pattern lookups
            parts.append(datasets.IterableDataset.from_generator(read_text_files, gen_kwargs={"paths": text_files}))
        for suffix, builder in TABLE_BUILDERS.items():
            chosen = [str(f) for f in files if f.suffix == suffix]
            if chosen:
                table = datasets.load_dataset(builder, data_files=chosen, split="train", streaming=True)
                parts.append(_text_column(table, args.text_field, chosen[0]))
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        total = len(text_files) if len(parts) == 1 and text_files else None
    ds = ds.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    if args.max_docs:
        ds = ds.take(args.max_docs)
        total = min(total, args.max_docs) if total is not None else args.max_docs
    return ds, total


def iter_texts(ds, field_hint: str):
    """The non-blank documents of ``ds``."""
    try:
        for row in ds:
            text = row["text"]
            if text and text.strip():
                yield text
    except KeyError:
        raise PrepareError(f"--text-field: no such column in {field_hint}") from None


def sample_lines(texts, sentences: int, seed: int) -> list[str]:
    """At most ``sentences`` non-blank lines of ``texts``, a uniform reservoir sample drawn with ``seed``: memory
    bounded by the sample, and the same input gives the same sample."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            seen += 1
            if len(sample) < sentences:
                sample.append(line)
            else:
                j = rng.randrange(seen)
                if j < sentences:
                    sample[j] = line
    return sample


def train_tokenizer(sample: list[str], vocab_size: int, num_threads: int) -> bytes:
    """A byte-fallback BPE sentencepiece model that keeps whitespace as is (code-friendly), trained on ``sample``
    (from ``sample_lines``; sentencepiece's own sampling is not reproducible, so it is given the sample whole,
    unshuffled)."""
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads, minloglevel=2)
    return buf.getvalue()


def token_dtype(vocab_size: int, fmt: str):
    """uint16 while the ids fit, else uint32 (zarr); Megatron's own choice, ``DType.optimal_dtype``, for megatron."""
    if fmt == "megatron":
        from pretrain.megatron_data import megatron

        return megatron("datasets.indexed_dataset").DType.optimal_dtype(vocab_size)
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


# -- the tokenizing workers -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(kind: str, blob: bytes, eos: str | None, bos: str | None, dtype, chunk_dir: str) -> None:
    _WORKER.update(tok=TextTokenizer(kind, blob, eos, bos), dtype=dtype, dir=Path(chunk_dir))


def _chunk_path(chunk_dir: Path, k: int) -> Path:
    return chunk_dir / f"{k:07d}.npz"


def tokenize_chunk(k: int, texts: list[str]) -> tuple[int, int]:
    """Tokenize one chunk of documents (EOS after each) and save it atomically as ``chunks/K.npz``: returns
    ``(documents, tokens)``."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    ids = tok.encode(texts, threads=1)  # the processes are the parallelism
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        tokens[pos + len(x)] = tok.eos_id
        pos += len(x) + 1
    path = _chunk_path(_WORKER["dir"], k)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, tokens=tokens, lengths=lengths)
    os.replace(tmp, path)
    return len(lengths), len(tokens)


def chunks(texts, chunk_bytes: int):
    """``(k, documents)`` of about ``chunk_bytes`` of text each, in order."""
    batch, size, k = [], 0, 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chunk_bytes:
            yield k, batch
            batch, size, k = [], 0, k + 1
    if batch:
        yield k, batch


def tokenize_all(texts, chunk_dir: Path, tok: TextTokenizer, dtype, args, total_docs: int | None) -> None:
    """Tokenize every chunk not yet saved in ``chunk_dir``, at most ``2 x --num-proc`` chunks in flight."""
    init = (tok.kind, tok.blob, tok.eos_token, tok.bos_token, dtype, str(chunk_dir))
    bar = tqdm(total=total_docs, unit="doc", desc="tokenize", smoothing=0.05)
    pool = None
    if args.num_proc > 1:  # fresh interpreters: a forked worker would copy the parent's heap as it touches it
        pool = ProcessPoolExecutor(args.num_proc, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=init)
    if pool is None:
        _init_worker(*init)
    pending: deque = deque()
    try:
        for k, batch in chunks(texts, int(args.chunk_mb * 2**20)):
            if _chunk_path(chunk_dir, k).exists():  # done by an earlier, interrupted run
                bar.update(len(batch))
                continue
            if pool is None:
                bar.update(tokenize_chunk(k, batch)[0])
                continue
            pending.append(pool.submit(tokenize_chunk, k, batch))
            while len(pending) >= 2 * args.num_proc:
                bar.update(pending.popleft().result()[0])
        while pending:
            bar.update(pending.popleft().result()[0])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def saved_chunks(chunk_dir: Path):
    """The saved chunks in order, each ``(tokens, lengths)``, read one at a time."""
    for path in sorted(chunk_dir.glob("*.npz")):
        with np.load(path) as z:
            yield z["tokens"], z["lengths"]


def _chunk_totals(chunk_dir: Path) -> tuple[int, int]:
    docs = tokens = 0
    for path in sorted(chunk_dir.glob("*.npz")):
        with np.load(path) as z:
            n = z["lengths"]
            docs, tokens = docs + len(n), tokens + int(n.sum())
    return docs, tokens


# -- the two output formats -------------------------------------------------------------------------------------

def write_zarr(out: Path, chunk_dir: Path, totals: tuple[int, int], tok: TextTokenizer, dtype, source: str,
               seed: int) -> dict:
    """Join the saved chunks (``totals``: their documents and tokens) into the zarr token store ``out`` (which must
    not exist); returns its attributes."""
    num_docs, total = totals
    group = zarr.open_group(str(out), mode="w-")
    tokens = group.create_array("tokens", shape=(total,), dtype=dtype, chunks=(CHUNK,))
    offsets = group.create_array("doc_offsets", shape=(num_docs + 1,), dtype=np.int64,
                                 chunks=(max(1, min(num_docs + 1, CHUNK)),))
    buf = np.empty(min(total, CHUNK * 4), dtype=dtype)
    pos = fill = 0
    doc, end = 0, 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="write zarr") as bar:
        offsets[0:1] = np.zeros(1, dtype=np.int64)
        for ids, lengths in saved_chunks(chunk_dir):
            ends = end + np.cumsum(lengths)
            offsets[doc + 1:doc + 1 + len(lengths)] = ends
            doc, end = doc + len(lengths), int(ends[-1])
            while len(ids):
                take = min(len(ids), len(buf) - fill)
                buf[fill:fill + take] = ids[:take]
                fill, ids = fill + take, ids[take:]
                if fill == len(buf):
                    tokens[pos:pos + fill] = buf
                    pos, fill = pos + fill, 0
                    bar.update(len(buf))
        if fill:
            tokens[pos:pos + fill] = buf[:fill]
            bar.update(fill)
    attrs = {"format": FORMAT, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
             "num_tokens": total, "num_docs": num_docs, "source": source, "seed": seed,
             "tokenizer_kind": tok.kind, **tok.special_tokens(),
             "tokenizer_model": base64.b64encode(tok.blob).decode()}
    group.attrs.update(attrs)
    (out / tok.file_name).write_bytes(tok.blob)
    return attrs


def save_tokenizer(directory: Path, tok: TextTokenizer) -> None:
    """``tokenizer.model``, or ``tokenizer.json`` with its ``tokenizer_config.json``: what ``read_tokenizer`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / tok.file_name).write_bytes(tok.blob)
    if tok.kind == "tokenizers":
        (directory / "tokenizer_config.json").write_text(json.dumps(tok.special_tokens()))


def write_megatron(prefix: Path, chunk_dir: Path, totals: tuple[int, int], tok: TextTokenizer, dtype) -> dict:
    """Join the saved chunks (``totals``: their documents and tokens) into a Megatron corpus ``prefix.bin`` /
    ``prefix.idx`` with megatron-core's own ``IndexedDatasetBuilder`` (one document per source document), and its
    tokenizer in ``prefix.tokenizer/``."""
    from pretrain.megatron_data import megatron

    num_docs, total = totals
    builder = megatron("datasets.indexed_dataset").IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    with tqdm(total=total, unit="tok", unit_scale=True, desc="write megatron") as bar:
        for ids, lengths in saved_chunks(chunk_dir):
            start = 0
            for n in lengths.tolist():
                builder.add_document(ids[start:start + n], [n])
                start += n
            bar.update(len(ids))
    builder.finalize(str(prefix) + ".idx")
    save_tokenizer(Path(str(prefix) + MEGATRON_TOKENIZER), tok)
    return {"num_tokens": total, "num_docs": num_docs}


def outputs(out: Path, fmt: str) -> list[Path]:
    """The paths a finished run writes."""
    if fmt == "zarr":
        return [out]
    return [Path(str(out) + s) for s in (".bin", ".idx", MEGATRON_TOKENIZER)]


# -- the command ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="token store directory to create (with --format megatron: the "
                    "prefix of the .bin/.idx files)")
    ap.add_argument("--format", default="zarr", choices=FORMATS, help="zarr token store, or Megatron .bin/.idx")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", help="text/json/jsonl/parquet files or directories")
    src.add_argument("--dataset", help="Hugging Face dataset: a hub name (needs network) or a local dataset directory")
    ap.add_argument("--dataset-config", default=None, help="dataset configuration name")
    ap.add_argument("--split", default="train", help="dataset split (with --dataset)")
    ap.add_argument("--streaming", action="store_true", help="stream --dataset instead of downloading it whole")
    ap.add_argument("--text-field", default="text", help="column holding the text (json/parquet/--dataset)")
    ap.add_argument("--tokenizer", help="existing tokenizer instead of training one: a sentencepiece .model, a "
                    "tokenizers .json, or a Hugging Face model directory holding either")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained tokenizer")
    ap.add_argument("--max-docs", type=int, default=0, help="keep at most this many documents (0: all)")
    ap.add_argument("--num-proc", type=int, default=2, help="tokenizer processes (the store does not depend on it)")
    ap.add_argument("--seed", type=int, default=0, help="document shuffle and tokenizer sample seed")
    ap.add_argument("--tokenizer-sentences", type=int, default=500_000,
                    help="lines sampled (seeded) to train a new tokenizer")
    ap.add_argument("--tokenizer-threads", type=int, default=1,
                    help="sentencepiece training threads (part of the settings: its result depends on them)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000, help="documents in the shuffle buffer (files and "
                    "dataset shards are shuffled too)")
    ap.add_argument("--chunk-mb", type=float, default=8.0, help="text per tokenizing chunk, in MiB (the unit of "
                    "resumption and of the memory in flight)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing store at --out, and start over "
                    "instead of resuming an interrupted run")
    return ap.parse_args(argv)


def _check_args(args) -> None:
    positive = {"--num-proc": args.num_proc, "--tokenizer-sentences": args.tokenizer_sentences,
                "--tokenizer-threads": args.tokenizer_threads,
                "--shuffle-buffer": args.shuffle_buffer, "--chunk-mb": args.chunk_mb}
    for flag, value in positive.items():
        if value <= 0:
            raise PrepareError(f"{flag} {value} must be positive")
    if args.max_docs < 0:
        raise PrepareError(f"--max-docs {args.max_docs} must be 0 (all) or positive")
    if args.vocab_size < 300 and not args.tokenizer:
        raise PrepareError(f"--vocab-size {args.vocab_size} is too small (at least 300: 256 byte pieces + specials)")
    if args.streaming and not args.dataset:
        raise PrepareError("--streaming applies to --dataset (local --input files are always streamed)")


def _partial(out: Path, args) -> Path:
    """The resumable staging directory ``OUT.partial``: checked against ``args``, or created."""
    partial = Path(str(out) + ".partial")
    settings = {k: getattr(args, k) for k in SETTINGS}
    saved = partial / "settings.json"
    if partial.exists() and args.overwrite:
        shutil.rmtree(partial)
    if partial.exists():
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        changed = [f"--{k.replace('_', '-')} ({old.get(k)!r} then, {v!r} now)" for k, v in settings.items()
                   if old.get(k) != v]
        if changed:
            raise PrepareError(f"{partial} holds an interrupted run with other settings: {', '.join(changed)}; run "
                               f"with the same settings to resume it, or pass --overwrite to start over")
        print(f"resuming the interrupted run in {partial}")
    else:
        (partial / "chunks").mkdir(parents=True)
        saved.write_text(json.dumps(settings, indent=1))
    return partial


def _tokenizer(args, partial: Path, ds) -> TextTokenizer:
    """``--tokenizer``, or the one an interrupted run trained, or a new one trained on a seeded sample."""
    if args.tokenizer:
        try:
            return read_tokenizer(args.tokenizer)
        except TokenizerError as e:
            raise PrepareError(f"--tokenizer {e}") from None
    trained = partial / "tokenizer"
    if trained.exists():
        return read_tokenizer(trained)
    sample = sample_lines(tqdm(iter_texts(ds, "the input"), unit="doc", desc="tokenizer sample"),
                          args.tokenizer_sentences, args.seed)
    if len(sample) < 2:
        raise PrepareError(f"{_source_name(args)}: no text to train a tokenizer on (only {len(sample)} non-blank "
                           "lines)")
    print(f"training a {args.vocab_size}-piece BPE tokenizer on {len(sample):,} sampled lines")
    try:  # in a fresh process: the trainer's peak memory is not kept by this one while it tokenizes
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as trainer:
            model = trainer.submit(train_tokenizer, sample, args.vocab_size, args.tokenizer_threads).result()
        del sample
        tok = TextTokenizer("sentencepiece", model)
    except RuntimeError as e:  # sentencepiece: e.g. fewer pieces than the sample's distinct characters
        raise PrepareError(f"--vocab-size {args.vocab_size}: sentencepiece cannot train it on this input "
                           f"({str(e).split('] ')[-1]})") from None
    save_tokenizer(trained.with_suffix(".tmp"), tok)
    os.replace(trained.with_suffix(".tmp"), trained)
    return tok


def _source_name(args) -> str:
    return (f"--dataset {args.dataset}" if args.dataset else f"--input {' '.join(args.input)}" if args.input
            else "python-stdlib")


def prepare(args) -> tuple[dict, TextTokenizer]:
    _check_args(args)
    out = Path(args.out)
    existing = [p for p in outputs(out, args.format) if p.exists()]
    if existing and not args.overwrite:
        raise PrepareError(f"--out {existing[0]} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)

    ds, total = open_documents(args)  # one stream, read once per pass
    if next(iter_texts(ds, _source_name(args)), None) is None:  # inputs and the text column checked before any work
        raise PrepareError(f"{_source_name(args)}: no non-empty documents")
    partial = _partial(out, args)
    clock = [("start", time.perf_counter())]
    try:
        tok = _tokenizer(args, partial, ds)
        clock.append(("tokenizer", time.perf_counter()))
        dtype = token_dtype(tok.vocab_size, args.format)
        tokenize_all(iter_texts(ds, _source_name(args)), partial / "chunks", tok, dtype, args, total)
        clock.append(("tokenize", time.perf_counter()))
        totals = _chunk_totals(partial / "chunks")
        if totals[0] < 2:
            raise PrepareError(f"{_source_name(args)}: only {totals[0]} non-empty documents; need at least 2 (train "
                               "and validation)")
    except PrepareError:
        if not (partial / "tokenizer").exists() and not any((partial / "chunks").glob("*.npz")):
            shutil.rmtree(partial)  # nothing worth resuming
        raise
    staged = partial / "out"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    name = out.name
    if args.format == "zarr":
        attrs = write_zarr(staged / name, partial / "chunks", totals, tok, dtype, _source_name(args), args.seed)
    else:
        attrs = write_megatron(staged / name, partial / "chunks", totals, tok, dtype)
    clock.append(("write", time.perf_counter()))
    print("seconds: " + ", ".join(f"{phase} {t - clock[i][1]:.1f}" for i, (phase, t) in enumerate(clock[1:])))
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in outputs(out, args.format):
        os.replace(staged / path.name, path)
    shutil.rmtree(partial)
    return attrs, tok


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        attrs, tok = prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f"{args.out}.bin/.idx (tokenizer: {args.out}{MEGATRON_TOKENIZER})" if args.format == "megatron" \
        else args.out
    print(f"wrote {where}: {attrs['num_tokens']:,} tokens, {attrs['num_docs']:,} documents, vocab {tok.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
