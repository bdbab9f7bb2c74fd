"""The two tokenizer formats a token store (and so a checkpoint and an export) can carry.

- ``sentencepiece``: a ``tokenizer.model`` (what ``tools/prepare_data.py`` trains, and Llama / Llama 2 ship);
- ``tokenizers``: a ``tokenizer.json`` of the Hugging Face tokenizers library (Llama 3, Mistral, most recent models),
  whose end- and begin-of-sequence tokens come from the ``tokenizer_config.json`` beside it when there is one.

``read_tokenizer`` takes either file, or a Hugging Face model directory (its ``tokenizer.model`` if present, else its
``tokenizer.json``).
"""

import hashlib
import json
from pathlib import Path

FILES = {"sentencepiece": "tokenizer.model", "tokenizers": "tokenizer.json"}
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def tokenizer_digest(blob: bytes) -> str:
    """A short fingerprint of a tokenizer file's contents: equal digests, same tokenizer."""
    return hashlib.sha256(blob).hexdigest()[:16]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


class TextTokenizer:
    """One tokenizer, from its format (``kind``) and file contents (``blob``)."""

    def __init__(self, kind: str, blob: bytes, eos_token: str | None = None, bos_token: str | None = None,
                 origin: str = "tokenizer"):
        if kind not in FILES:
            raise TokenizerError(f"{origin}: tokenizer kind {kind!r}; allowed: {', '.join(FILES)}")
        self.kind, self.blob, self.file_name, self.origin = kind, blob, FILES[kind], origin
        if kind == "sentencepiece":
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_proto=blob)
            except RuntimeError as e:
                raise TokenizerError(f"{origin}: not a sentencepiece model ({e})") from None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id, self.bos_id = self._sp.eos_id(), self._sp.bos_id()
            self.eos_token = self._sp.id_to_piece(self.eos_id) if self.eos_id >= 0 else None
            self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
            return
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(blob.decode())
        except Exception as e:  # the library raises its own exception types for malformed JSON
            raise TokenizerError(f"{origin}: not a tokenizers tokenizer.json ({e})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or next((t for t in EOS_NAMES if t in vocab), None)
        self.bos_token = bos_token or next((t for t in BOS_NAMES if t in vocab), None)
        if self.eos_token not in vocab:
            raise TokenizerError(f"{origin}: no end-of-sequence token (looked for eos_token in tokenizer_config.json "
                                 f"and for {list(EOS_NAMES)}); documents are joined with it")
        self.eos_id = vocab[self.eos_token]
        self.bos_id = vocab[self.bos_token] if self.bos_token in vocab else -1

    def encode(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """Token ids of each text; ``threads=1`` encodes on the calling thread only (default: the library's pool)."""
        if self.kind == "sentencepiece":
            return self._sp.encode(texts, num_threads=threads or -1)
        if threads == 1:
            return [self._tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def special_tokens(self) -> dict[str, str]:
        """``eos_token`` and ``bos_token`` (those that exist), for a ``tokenizer_config.json``."""
        return {k: v for k, v in (("eos_token", self.eos_token), ("bos_token", self.bos_token)) if v is not None}


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer in ``path``: a ``.model`` or ``.json`` file, or a directory holding one (``tokenizer.model``
    first)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in FILES.values() if (path / f).is_file()]
        if not found:
            raise TokenizerError(f"{path}: no {' or '.join(FILES.values())}")
        path = found[0]
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file")
    if path.suffix == ".json":
        config = path.parent / "tokenizer_config.json"
        special = json.loads(config.read_text()) if config.is_file() else {}
        return TextTokenizer("tokenizers", path.read_bytes(), _token(special.get("eos_token")),
                             _token(special.get("bos_token")), str(path))
    return TextTokenizer("sentencepiece", path.read_bytes(), origin=str(path))


def tokenizer_files(corpus) -> dict[str, bytes | str]:
    """The files a checkpoint carries for the tokenizer of ``corpus`` (a ``pretrain.data.Corpus``):
    ``tokenizer.model``, or ``tokenizer.json`` with a ``tokenizer_config.json`` naming its special tokens."""
    files: dict[str, bytes | str] = {FILES[corpus.tokenizer_kind]: corpus.tokenizer_model}
    if corpus.tokenizer_kind == "tokenizers":
        files["tokenizer_config.json"] = json.dumps(corpus.special_tokens)
    return files
