"""Token stores, deterministic sampling, blending, splits and data errors."""

import numpy as np
import pytest
import sentencepiece as spm

from pretrain.config import DataConfig
from pretrain.data import Corpus, DataError, TokenStore
from tools.prepare_data import main as prepare_main


def test_store_round_trips_text(tiny_store):
    store = TokenStore(tiny_store)
    sp = spm.SentencePieceProcessor(model_proto=store.tokenizer_model)
    assert store.vocab_size == sp.get_piece_size() == 512
    first_doc = store.window(0, int(store.doc_offsets[1]))
    assert first_doc[-1] == store.eos_id
    text = sp.decode(first_doc[:-1].tolist())
    assert len(text) > 100 and ("def " in text or "import " in text or "class " in text)


def test_sampling_is_a_function_of_the_sample_index(tiny_store):
    cfg = DataConfig(paths=[str(tiny_store)], seq_len=32)
    a, b = Corpus(cfg), Corpus(cfg)
    x_full, _ = a.train.batch(0, 24)
    x_resumed, _ = b.train.batch(16, 8)  # a fresh loader starting at a consumed-sample count
    assert (x_full[16:] == x_resumed).all()
    x, y = a.train.batch(5, 3)
    assert (x[:, 1:] == y[:, :-1]).all()


def test_epochs_cover_every_window_once_in_new_order(tiny_store):
    corpus = Corpus(DataConfig(paths=[str(tiny_store)], seq_len=512))
    split = corpus.train.sources[0]
    epoch0, epoch1 = split._perm(0), split._perm(1)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(split.n))
    assert (epoch0 != epoch1).any()  # the next epoch is reshuffled
    k = int(epoch1[3])
    assert (split[split.n + 3] == split.store.window(k * 512, 513)).all()


def test_train_and_validation_do_not_overlap(tiny_store):
    corpus = Corpus(DataConfig(paths=[str(tiny_store)], seq_len=64, val_fraction=0.1))
    store = corpus.stores[0]
    cut = store.split_point(0.1)
    assert cut in set(store.doc_offsets.tolist())  # a document boundary
    train, val = corpus.train.sources[0], corpus.val.sources[0]
    assert train.lo + train.n * 64 + 1 <= cut and val.lo == cut
    assert 0.05 < (store.num_tokens - cut) / store.num_tokens < 0.2


def test_blend_follows_weights(tiny_store, tmp_path):
    cfg = DataConfig(paths=[str(tiny_store), str(tiny_store)], weights=[3, 1], seq_len=32)
    corpus = Corpus(cfg)
    corpus.train.sample(399)
    counts = np.bincount(corpus.train._source[:400], minlength=2)
    assert counts.tolist() == [300, 100]
    prefix = np.bincount(corpus.train._source[:10], minlength=2)
    assert abs(prefix[0] - 7.5) <= 1


def test_data_errors_name_the_path(tiny_store, tmp_path):
    with pytest.raises(DataError, match=r"data.paths\[0\]=.*nowhere: no token store there; create it with"):
        Corpus(DataConfig(paths=[str(tmp_path / "nowhere")]))
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match=r"not a token store"):
        Corpus(DataConfig(paths=[str(tmp_path / "junk")]))
    other = tmp_path / "other"
    assert prepare_main(["--out", str(other), "--max-docs", "20", "--vocab-size", "400", "--num-proc", "1"]) == 0
    with pytest.raises(DataError, match=r"data.paths\[1\]=.*different tokenizer"):
        Corpus(DataConfig(paths=[str(tiny_store), str(other)]))
    with pytest.raises(DataError, match=r"cannot fill one window of data.seq_len=1000000"):
        Corpus(DataConfig(paths=[str(tiny_store)], seq_len=1_000_000))


def test_prefetching_draws_the_same_samples(tiny_store):
    from pretrain.data import Prefetcher

    corpus = Corpus(DataConfig(paths=[str(tiny_store)], seq_len=32))
    ahead, plain = Prefetcher(corpus.train), Prefetcher(Corpus(DataConfig(paths=[str(tiny_store)], seq_len=32)).train,
                                                         enabled=False)
    for start in (0, 8, 16, 40):  # 40: not the announced 24, drawn directly
        a = ahead.batch(start, 8, start + 8)
        b = plain.batch(start, 8, start + 8)
        assert all((x == y).all() for x, y in zip(a, b)) and ahead.load_s > 0
