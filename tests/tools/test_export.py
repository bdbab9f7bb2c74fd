"""Export to Hugging Face Llama: vanilla transformers reproduces our logits and generates."""

import pytest
import torch

from pretrain.checkpoint import load_model
from pretrain.train import main as train_main
from tools.convert_to_hf import export_llama
from tools.hf_generate import main as generate_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store):
    from tests.conftest import tiny_overrides

    run = tmp_path_factory.mktemp("export") / "run"
    spec = "{q: {kind: monarch, blocks: 4}, k: {kind: lowrank, rank: 8}, v: {kind: blocksparse, block_size: 8}, " \
           "o: {kind: nm}, mlp: {kind: blast, blocks: 4, rank: 8}, down: {kind: sparse_lowrank, rank: 8}}"
    args = []
    for o in tiny_overrides(tiny_store, run, **{"model.structure": spec, "train.steps": 10}):
        args += ["--set", o]
    assert train_main(args) == 0
    return run


def test_export_matches_our_logits_and_generates(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    report = export_llama(trained / "checkpoints", out)
    assert report["max_abs_logit_diff"] < 1e-4 * max(1.0, report["logit_scale"])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()

    from transformers import AutoModelForCausalLM

    ours, _, _ = load_model(trained / "checkpoints")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    assert generate_main(["--model", str(out), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_export_refuses_existing_output(trained, tmp_path):
    from pretrain.config import UserError

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_llama(trained / "checkpoints", out)
    assert (out / "keep.txt").read_text() == "mine"
