"""Megatron ``.bin/.idx`` corpora (megatron-core's IndexedDataset and builder): reading, blending with zarr stores,
the run's tokenizer, the Megatron sample order, exact resumption, and the errors for bad corpora."""

import shutil

import numpy as np
import pytest
import torch

from pretrain.config import DataConfig
from pretrain.data import Corpus, DataError, MegatronStore, TokenStore
from pretrain.megatron_data import megatron
from pretrain.train import main
from tests.conftest import cli, losses, tiny_overrides
from tools.prepare_data import main as prepare_main


@pytest.fixture(scope="module")
def corpora(tiny_store, tmp_path_factory):
    """``mega``: a Megatron corpus with its tokenizer beside it; ``bare``: the same written by megatron-core's own
    builder from the tiny store's documents, with no tokenizer (as Megatron-LM's preprocess_data writes them)."""
    root = tmp_path_factory.mktemp("megatron")
    assert prepare_main(["--out", str(root / "mega"), "--format", "megatron", "--max-docs", "120", "--seed", "3",
                         "--tokenizer", str(tiny_store / "tokenizer.model"), "--num-proc", "1"]) == 0
    store = TokenStore(tiny_store)
    builder = megatron("datasets.indexed_dataset").IndexedDatasetBuilder(str(root / "bare.bin"), dtype=np.uint16)
    for a, b in zip(store.doc_offsets[:-1], store.doc_offsets[1:]):
        builder.add_document(torch.from_numpy(store.window(int(a), int(b - a))), [int(b - a)])
    builder.finalize(str(root / "bare.idx"))
    return root


def test_a_megatron_corpus_reads_as_its_tokens(tiny_store, corpora):
    zarr_store = TokenStore(tiny_store)
    bare = MegatronStore(str(corpora / "bare"), "data.paths[0]", _tok(tiny_store), "data.tokenizer")
    assert bare.num_tokens == zarr_store.num_tokens and (bare.doc_offsets == zarr_store.doc_offsets).all()
    for start in (0, 12345, bare.num_tokens - 65):
        assert (bare.window(start, 65) == zarr_store.window(start, 65)).all()
    # same split, same windows: a Megatron corpus samples exactly like the zarr store it was made from
    a = Corpus(DataConfig(paths=[str(tiny_store)], seq_len=64))
    b = Corpus(DataConfig(paths=[str(corpora / "bare.bin")], seq_len=64, tokenizer=str(tiny_store / "tokenizer.model")))
    assert all((x == y).all() for x, y in zip(a.train.batch(40, 8), b.train.batch(40, 8)))


def _tok(store):
    from pretrain.tokenizer import read_tokenizer

    return read_tokenizer(store / "tokenizer.model")


def test_megatron_sampler_is_megatron_cores_gpt_dataset_order(corpora):
    """Without a process group (BlendedDataset's get_rank pitfall is not reached), blended by weight."""
    assert not torch.distributed.is_initialized()
    cfg = DataConfig(paths=[str(corpora / "mega"), str(corpora / "mega")], weights=[0.25, 0.75], seq_len=32,
                     sampler="megatron", seed=5)
    corpus = Corpus(cfg, samples=(200, 8))
    x, y = corpus.train.batch(0, 200)
    assert x.shape == (200, 32) and (x[:, 1:] == y[:, :-1]).all()
    again = Corpus(cfg, samples=(200, 8))
    assert (again.train.batch(150, 10)[0] == x[150:160]).all()  # a pure function of the sample index
    counts = np.bincount(corpus.train.dataset.dataset_index[:200], minlength=2)
    assert abs(counts[1] / 200 - 0.75) < 0.02
    single = Corpus(DataConfig(paths=[str(corpora / "mega")], seq_len=32, sampler="megatron", seed=5), (50, 8))
    gpt = single.train.dataset  # megatron-core's GPTDataset itself
    assert type(gpt).__name__ == "GPTDataset" and (single.train.batch(7, 1)[0][0] == gpt[7]["tokens"]).all()
    assert len(gpt) >= 50  # whole epochs of at least the samples asked for, as Megatron-LM builds them
    with pytest.raises(Exception, match=f"index holds {len(gpt)} samples"):
        single.train.batch(len(gpt) - 2, 4)


def test_a_split_with_no_documents_is_refused_instead_of_looping_forever(corpora, tmp_path):
    store = MegatronStore(str(corpora / "mega"), "data.paths[0]", None, "")
    builder = megatron("datasets.indexed_dataset").IndexedDatasetBuilder(str(tmp_path / "few.bin"), dtype=np.uint16)
    for i in range(3):
        builder.add_document(torch.from_numpy(store.window(i * 3000, 3000)), [3000])
    builder.finalize(str(tmp_path / "few.idx"))
    shutil.copytree(corpora / "mega.tokenizer", tmp_path / "few.tokenizer")
    cfg = DataConfig(paths=[str(tmp_path / "few")], seq_len=32, sampler="megatron", val_fraction=0.05)
    with pytest.raises(Exception, match=r"validation split gets 0 of its 3 documents .* loop forever"):
        Corpus(cfg, samples=(10, 4))


def test_bad_megatron_inputs_name_the_path(tiny_store, corpora, tmp_path):
    shutil.copy(corpora / "bare.bin", tmp_path / "half.bin")
    with pytest.raises(DataError, match=r"data.paths\[0\]=.*half: .*half.bin has no .*half.idx beside it"):
        Corpus(DataConfig(paths=[str(tmp_path / "half")], tokenizer=str(tiny_store / "tokenizer.model")))
    with pytest.raises(DataError, match=r"records no tokenizer .* set data.tokenizer"):
        Corpus(DataConfig(paths=[str(corpora / "bare")]))
    other = tmp_path / "other"
    assert prepare_main(["--out", str(other), "--max-docs", "10", "--vocab-size", "400", "--seed", "9",
                         "--num-proc", "1", "--tokenizer-sentences", "3000"]) == 0
    with pytest.raises(DataError, match=r"data.paths\[1\]=.*other uses a different tokenizer than data.paths\[0\]"):
        Corpus(DataConfig(paths=[str(corpora / "mega"), str(other)]))
    with pytest.raises(DataError, match=r"token id \d+ does not fit the 400-token vocabulary of data.tokenizer="):
        Corpus(DataConfig(paths=[str(corpora / "bare")], tokenizer=str(other / "tokenizer.model")))
    with pytest.raises(Exception, match=r"data.sampler=megatron reads Megatron corpora only, and data.paths\[0\]="):
        Corpus(DataConfig(paths=[str(tiny_store)], sampler="megatron"), samples=(10, 4))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["native", "megatron"])
def test_training_on_a_megatron_corpus_resumes_exactly(tiny_store, corpora, tmp_path, sampler):
    """A Megatron corpus from megatron-core's builder, blended with a zarr store (native sampler) or alone (the
    Megatron order): an interrupted run resumes to the uninterrupted losses."""
    paths = f"[{corpora / 'bare'}, {tiny_store}]" if sampler == "native" else f"[{corpora / 'bare'}]"
    extra = {"data.paths": paths, "data.tokenizer": str(tiny_store / "tokenizer.model"), "data.sampler": sampler}

    def args(out, **kw):
        return cli(tiny_overrides(tiny_store, out, **extra, **kw))

    assert main(args(tmp_path / "straight")) == 0
    assert main(args(tmp_path / "split", **{"train.exit_after_steps": 7})) == 0
    assert main(args(tmp_path / "split") + ["--resume", "auto"]) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(a) == list(range(1, 21)) and all(a[s] == b[s] for s in a)
    assert losses(tmp_path / "straight", "val/loss") == losses(tmp_path / "split", "val/loss")


def test_train_cli_stops_with_exit_2_on_a_bin_without_idx(tiny_store, corpora, tmp_path, capsys):
    shutil.copy(corpora / "bare.bin", tmp_path / "lone.bin")
    code = main(cli(tiny_overrides(tiny_store, tmp_path / "run", **{"data.paths": f"[{tmp_path / 'lone'}]"})))
    assert code == 2 and "lone.idx beside it" in capsys.readouterr().err
    code = main(cli(tiny_overrides(tiny_store, tmp_path / "run", **{"model.vocab_size": 256})))
    assert code == 2 and "model.vocab_size=256 is smaller than the tokenizer vocabulary 512" in capsys.readouterr().err
