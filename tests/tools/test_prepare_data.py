"""tools/prepare_data.py: local inputs, tokenizer reuse, determinism, resumption, streaming, Megatron output, and
never clobbering a store."""

import json

import pytest

import tools.prepare_data as prepare_data
from pretrain.data import MegatronStore, TokenStore
from tools.prepare_data import main


def test_jsonl_and_text_inputs_with_existing_tokenizer(tiny_store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 50)
    (src / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i} " * 20}) for i in range(30)))
    out = tmp_path / "store"
    code = main(["--out", str(out), "--input", str(src), "--text-field", "body",
                 "--tokenizer", str(tiny_store / "tokenizer.model"), "--num-proc", "1"])
    assert code == 0
    store = TokenStore(out)
    assert len(store.doc_offsets) - 1 == 31 and store.vocab_size == 512
    assert store.tokenizer_digest == TokenStore(tiny_store).tokenizer_digest


def test_existing_output_is_never_overwritten(tiny_store, tmp_path, capsys):
    before = sorted(p.name for p in tiny_store.iterdir())
    assert main(["--out", str(tiny_store), "--max-docs", "5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_store.iterdir()) == before


def test_bad_inputs_are_reported(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "none.model")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_same_input_and_seed_give_a_byte_identical_store(tmp_path):
    """The tokenizer trains on a seeded reservoir sample (here smaller than the corpus, so sampling matters); the
    chunks do not depend on the number of processes."""
    args = ["--max-docs", "60", "--vocab-size", "400", "--tokenizer-sentences", "1500", "--chunk-mb", "0.1"]
    for name, procs in (("a", "2"), ("b", "1")):
        assert main(["--out", str(tmp_path / name), *args, "--num-proc", procs]) == 0
    assert main(["--out", str(tmp_path / "c"), *args, "--seed", "1"]) == 0
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    assert a["tokenizer.model"] != c["tokenizer.model"]  # another seed, another sample


def test_sample_lines_is_a_bounded_seeded_uniform_sample():
    from tools.prepare_data import sample_lines

    texts = [f"line {i}\n\n" for i in range(10_000)]
    s = sample_lines(texts, 500, seed=3)
    assert len(s) == 500 and s == sample_lines(texts, 500, seed=3) and s != sample_lines(texts, 500, seed=4)
    picked = sorted(int(x.split()[1]) for x in s)
    assert 200 < sum(p < 5000 for p in picked) < 300  # about half from each half of the stream


SMALL = ["--max-docs", "40", "--vocab-size", "512", "--tokenizer-sentences", "2000", "--chunk-mb", "0.05",
         "--num-proc", "1"]


def test_an_interrupted_prepare_resumes_to_the_same_store(tmp_path, monkeypatch, capsys):
    assert main(["--out", str(tmp_path / "whole"), *SMALL]) == 0
    real, calls = prepare_data.tokenize_chunk, []

    def dies_at_the_third(k, texts):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(k, texts)

    monkeypatch.setattr(prepare_data, "tokenize_chunk", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        main(["--out", str(tmp_path / "resumed"), *SMALL])
    partial = tmp_path / "resumed.partial"
    assert not (tmp_path / "resumed").exists() and len(list((partial / "chunks").glob("*.npz"))) == 2
    # other settings are refused, naming the flag; the interrupted run is kept
    assert main(["--out", str(tmp_path / "resumed"), *SMALL, "--seed", "5"]) == 2
    assert "--seed (0 then, 5 now)" in capsys.readouterr().err and partial.exists()
    monkeypatch.setattr(prepare_data, "tokenize_chunk", real)
    assert main(["--out", str(tmp_path / "resumed"), *SMALL]) == 0
    assert "resuming" in capsys.readouterr().out
    assert not partial.exists()
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert len(calls) == 3  # the resumed run did not redo the two saved chunks (it ran the real function)


def _jsonl_dir(root, rows=30):
    root.mkdir()
    for part in range(3):
        lines = (json.dumps({"body": f"document {part}-{i}: " + "some words here " * (5 + i)}) for i in range(rows))
        (root / f"part-{part}.jsonl").write_text("\n".join(lines))
    return root


def test_streaming_a_dataset_directory_takes_the_local_files_path(tiny_store, tmp_path):
    """``--dataset DIR --streaming`` (the hub's code path, on a local dataset directory: no network) and
    ``--input DIR`` give the same store."""
    src = _jsonl_dir(tmp_path / "ds")
    common = ["--tokenizer", str(tiny_store / "tokenizer.model"), "--text-field", "body", "--num-proc", "1"]
    assert main(["--out", str(tmp_path / "hub"), "--dataset", str(src), "--streaming", *common]) == 0
    assert main(["--out", str(tmp_path / "local"), "--input", str(src), *common]) == 0
    hub, local = TokenStore(tmp_path / "hub"), TokenStore(tmp_path / "local")
    assert len(hub.doc_offsets) - 1 == 90 and hub.num_tokens == local.num_tokens
    assert (hub.window(0, hub.num_tokens) == local.window(0, local.num_tokens)).all()


def test_megatron_output_holds_the_zarr_stores_tokens(tiny_store, tmp_path):
    """``--format megatron`` writes the same documents, through megatron-core's IndexedDatasetBuilder, with the
    tokenizer beside them."""
    common = ["--max-docs", "30", "--tokenizer", str(tiny_store / "tokenizer.model"), "--num-proc", "1"]
    assert main(["--out", str(tmp_path / "z"), *common]) == 0
    assert main(["--out", str(tmp_path / "m" / "corpus"), "--format", "megatron", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["corpus.bin", "corpus.idx", "corpus.tokenizer"]
    z, m = TokenStore(tmp_path / "z"), MegatronStore(str(tmp_path / "m" / "corpus"), "data.paths[0]", None, "")
    assert (z.doc_offsets == m.doc_offsets).all() and m.tokenizer_digest == z.tokenizer_digest
    assert (z.window(0, z.num_tokens) == m.window(0, m.num_tokens)).all()
    doc = m.dataset[3]  # megatron-core's own reader: one document, ending in EOS
    assert doc[-1] == m.eos_id and len(doc) == z.doc_offsets[4] - z.doc_offsets[3]
    assert main(["--out", str(tmp_path / "m" / "corpus"), "--format", "megatron", *common]) == 2  # never clobbered


def test_empty_and_bad_inputs_stop_before_any_work(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n\n")
    (empty / "b.txt").write_text("")
    assert main(["--out", str(tmp_path / "x"), "--input", str(empty)]) == 2
    assert f"--input {empty}: no non-empty documents" in capsys.readouterr().err
    src = _jsonl_dir(tmp_path / "j")
    assert main(["--out", str(tmp_path / "x"), "--input", str(src), "--text-field", "nope"]) == 2
    assert "--text-field 'nope'" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--chunk-mb", "0"]) == 2
    assert "--chunk-mb 0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--max-docs", "20", "--vocab-size", "300"]) == 2
    assert "--vocab-size 300: sentencepiece cannot train it" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))
