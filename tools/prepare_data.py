"""Prepare a token store: raw text -> sentencepiece tokenizer -> zarr token array.

Usage:
    python tools/prepare_data.py --out data/stdlib                       # Python standard library sources
    python tools/prepare_data.py --out data/mine --input corpus/ notes.jsonl --vocab-size 8192
    python tools/prepare_data.py --out data/wiki --dataset wikitext --dataset-config wikitext-2-raw-v1
    python tools/prepare_data.py --out data/b --input more/ --tokenizer data/stdlib/tokenizer.model
    python tools/prepare_data.py --out data/c --input more/ --tokenizer path/to/hf-model   # its tokenizer

Sources: ``--input`` files or directories (.txt/.md/.py/.rst read as one document per file, .json/.jsonl/
.parquet rows with a ``--text-field``), a Hugging Face ``--dataset``, or by default the ``.py`` sources of
the running interpreter's standard library (real text present on every machine, nothing downloaded).
Documents are shuffled with ``--seed``, tokenized in ``--num-proc`` processes, joined with EOS and written
to ``OUT`` (written under a temporary name and renamed, so a failed run leaves nothing half-written).
"""

import argparse
import base64
import io
import random
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import zarr
from tqdm import tqdm

from pretrain.data import FORMAT
from pretrain.tokenizer import TextTokenizer, TokenizerError, read_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CHUNK = 1 << 20


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
            raise SystemExit(f"error: --input {item}: no such file or directory")
    if not files:
        raise SystemExit(f"error: --input {inputs}: no .txt/.md/.py/.rst/.json/.jsonl/.parquet files found")
    return files


def load_documents(args, cache_dir: str):
    """A ``datasets.Dataset`` with one ``text`` column, shuffled by ``--seed`` and cut to ``--max-docs``."""
    import datasets

    datasets.disable_caching()
    if args.dataset:
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split, cache_dir=cache_dir)
        ds = ds.select_columns([args.text_field]).rename_column(args.text_field, "text") \
            if args.text_field != "text" else ds.select_columns(["text"])
    else:
        files = _expand(args.input) if args.input else stdlib_files()
        parts = []
        text_files = [str(f) for f in files if f.suffix not in TABLE_BUILDERS]
        if text_files:
            parts.append(datasets.load_dataset("text", data_files=text_files, sample_by="document",
                                               split="train", cache_dir=cache_dir, encoding_errors="replace"))
        for suffix, builder in TABLE_BUILDERS.items():
            chosen = [str(f) for f in files if f.suffix == suffix]
            if chosen:
                table = datasets.load_dataset(builder, data_files=chosen, split="train", cache_dir=cache_dir)
                if args.text_field not in table.column_names:
                    raise SystemExit(f"error: --text-field {args.text_field!r} is not a column of {chosen[0]}; "
                                     f"columns: {table.column_names}")
                parts.append(table.select_columns([args.text_field]).rename_column(args.text_field, "text")
                             if args.text_field != "text" else table.select_columns(["text"]))
        ds = datasets.concatenate_datasets(parts)
    ds = ds.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(ds) < 2:
        raise SystemExit(f"error: only {len(ds)} non-empty documents; need at least 2 (train and validation)")
    ds = ds.shuffle(seed=args.seed)
    if args.max_docs:
        ds = ds.select(range(min(args.max_docs, len(ds))))
    return ds


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


def train_tokenizer(ds, vocab_size: int, num_threads: int, sentences: int = 500_000, seed: int = 0) -> bytes:
    """A byte-fallback BPE sentencepiece model that keeps whitespace as is (code-friendly), trained on a seeded
    sample of at most ``sentences`` lines (``sample_lines``; sentencepiece's own sampling is not reproducible, so
    it is given the sample whole, unshuffled)."""
    texts = (text for batch in ds.iter(batch_size=256) for text in batch["text"])  # not the whole column at once
    sample = sample_lines(texts, sentences, seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads, minloglevel=2)
    return buf.getvalue()


_PROCESSORS: dict[tuple, TextTokenizer] = {}


def _encode(batch, kind: str, model: bytes, eos: str | None, bos: str | None):
    key = (kind, hash(model), eos, bos)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = TextTokenizer(kind, model, eos, bos)
    tok = _PROCESSORS[key]
    return {"ids": [x + [tok.eos_id] for x in tok.encode(batch["text"])]}


def write_store(out: Path, tokenized, tok: TextTokenizer, source: str, seed: int) -> dict:
    """Write the zarr token store to ``out`` (which must not exist); returns its attributes."""
    lengths = np.asarray([len(x) for x in tokenized["ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    vocab_size = tok.vocab_size
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    group = zarr.open_group(str(out), mode="w-")
    tokens = group.create_array("tokens", shape=(total,), dtype=dtype, chunks=(CHUNK,))
    group.create_array("doc_offsets", data=offsets, chunks=(max(1, min(len(offsets), CHUNK)),))
    buf = np.empty(min(total, CHUNK * 4), dtype=dtype)
    pos, fill = 0, 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="write tokens") as bar:
        for ids in tokenized["ids"]:
            ids = np.asarray(ids, dtype=dtype)
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
    attrs = {"format": FORMAT, "vocab_size": vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
             "num_tokens": total, "num_docs": len(lengths), "source": source, "seed": seed,
             "tokenizer_kind": tok.kind, **tok.special_tokens(),
             "tokenizer_model": base64.b64encode(tok.blob).decode()}
    group.attrs.update(attrs)
    (out / tok.file_name).write_bytes(tok.blob)
    return attrs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="token store directory to create")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", nargs="+", help="text/json/jsonl/parquet files or directories")
    src.add_argument("--dataset", help="Hugging Face dataset name (needs network access)")
    ap.add_argument("--dataset-config", default=None, help="dataset configuration name")
    ap.add_argument("--split", default="train", help="dataset split (with --dataset)")
    ap.add_argument("--text-field", default="text", help="column holding the text (json/parquet/--dataset)")
    ap.add_argument("--tokenizer", help="existing tokenizer instead of training one: a sentencepiece .model, a "
                    "tokenizers .json, or a Hugging Face model directory holding either")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained tokenizer")
    ap.add_argument("--max-docs", type=int, default=0, help="keep at most this many documents (0: all)")
    ap.add_argument("--num-proc", type=int, default=2, help="tokenizer processes")
    ap.add_argument("--seed", type=int, default=0, help="document shuffle and tokenizer sample seed")
    ap.add_argument("--tokenizer-sentences", type=int, default=500_000,
                    help="lines sampled (seeded) to train a new tokenizer")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: --out {out} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.vocab_size < 300 and not args.tokenizer:
        print(f"error: --vocab-size {args.vocab_size} is too small (at least 300: 256 byte pieces + specials)",
              file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        ds = load_documents(args, cache_dir=str(Path(tmp) / "hf-cache"))
        if args.tokenizer:
            try:
                tok = read_tokenizer(args.tokenizer)
            except TokenizerError as e:
                print(f"error: --tokenizer {e}", file=sys.stderr)
                return 2
        else:
            print(f"training a {args.vocab_size}-piece BPE tokenizer on {len(ds):,} documents")
            tok = TextTokenizer("sentencepiece", train_tokenizer(ds, args.vocab_size, args.num_proc,
                                                                 args.tokenizer_sentences, args.seed))
        vocab = tok.vocab_size
        tokenized = ds.map(_encode, batched=True, batch_size=64,
                           fn_kwargs={"kind": tok.kind, "model": tok.blob, "eos": tok.eos_token, "bos": tok.bos_token},
                           num_proc=args.num_proc if args.num_proc > 1 else None,
                           remove_columns=["text"], desc="tokenize")
        source = args.dataset or (" ".join(args.input) if args.input else "python-stdlib")
        staged = Path(tmp) / "store"
        attrs = write_store(staged, tokenized, tok, source, args.seed)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    print(f"wrote {out}: {attrs['num_tokens']:,} tokens, {attrs['num_docs']:,} documents, vocab {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
