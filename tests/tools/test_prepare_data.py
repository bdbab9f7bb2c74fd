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
