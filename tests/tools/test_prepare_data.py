"""tools/prepare_data.py: local inputs, tokenizer reuse, and never clobbering a store."""

import json

from pretrain.data import TokenStore
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
    """The tokenizer trains on a seeded reservoir sample (here smaller than the corpus, so sampling matters)."""
    args = ["--max-docs", "60", "--vocab-size", "400", "--num-proc", "2", "--tokenizer-sentences", "1500"]
    for name in ("a", "b"):
        assert main(["--out", str(tmp_path / name), *args]) == 0
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
