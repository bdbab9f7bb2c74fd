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


SPEC_B = ("{q: {kind: blockdiag, blocks: 4, shuffle: true}, k: {kind: dense}, v: {kind: lowrank, rank: 8}, "
          "o: {kind: monarch, blocks: 4, rank: 2}, mlp: {kind: sparse_lowrank, rank: 8, init: sltrain}, "
          "down: {kind: nm, n: 1, m: 4}}")


@pytest.fixture(scope="module")
def trained_b(tmp_path_factory, tiny_store):
    from tests.conftest import tiny_overrides

    run = tmp_path_factory.mktemp("export-b") / "run"
    args = []
    for o in tiny_overrides(tiny_store, run, **{"model.structure": SPEC_B, "train.steps": 2}):
        args += ["--set", o]
    assert train_main(args) == 0
    return run


@pytest.mark.parametrize("run", ["trained", "trained_b"])
def test_structured_export_keeps_the_factors_and_generates_like_the_dense_one(run, request, tmp_path):
    """Every structure (A: monarch, lowrank, block-sparse, N:M, BLAST, sparse plus low-rank; B: block-diagonal
    with shuffle, dense, low-rank, Monarch rank 2, SLTrain-initialised sparse plus low-rank, 1:4) through the
    remote-code export: our parameter count, our logits, and the densified export's greedy tokens."""
    from transformers import AutoModelForCausalLM

    ckpt = request.getfixturevalue(run) / "checkpoints"
    report = export_llama(ckpt, tmp_path / "structured", fmt="structured")
    export_llama(ckpt, tmp_path / "dense")
    files = {p.name for p in (tmp_path / "structured").iterdir()}
    assert {"configuration_structorch.py", "modeling_structorch.py", "model.safetensors", "tokenizer.model"} <= files
    for name in ("modeling_structorch.py", "configuration_structorch.py"):  # torch and transformers only
        lines = (tmp_path / "structured" / name).read_text().splitlines()
        imports = {line.split()[1].split(".")[0] for line in lines if line.startswith(("import ", "from "))}
        assert imports <= {"torch", "transformers", ""}, (name, imports)  # "": the relative import
    ours, _, _ = load_model(ckpt)
    structured = AutoModelForCausalLM.from_pretrained(tmp_path / "structured", dtype=torch.float32,
                                                      trust_remote_code=True).eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    assert structured.num_parameters() == ours.num_params() == report["params_dense"] < dense.num_parameters()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(structured(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
    prompt = tokens[:1, :6]
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert structured.generate(prompt, **kw).tolist() == dense.generate(prompt, **kw).tolist()  # KV cache on


def test_structured_export_of_a_pruned_dense_model_keeps_only_the_kept_weights(tiny_store, tmp_path):
    """Dense projections pruned by gmp (element masks) go out as their kept values: our parameter count, our logits."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_overrides

    rules = "[{select: default, method: gmp, target: 0.5, start: 0.0, end: 0.5, interval: 1}]"
    args = []
    for o in [*tiny_overrides(tiny_store, tmp_path / "run", **{"train.steps": 4}), f"sparsity.rules={rules}"]:
        args += ["--set", o]
    assert train_main(args) == 0
    report = export_llama(tmp_path / "run" / "checkpoints", tmp_path / "hf", fmt="structured")
    ours, _, _ = load_model(tmp_path / "run" / "checkpoints")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, trust_remote_code=True).eval()
    assert hf.num_parameters() == ours.num_params() == report["params_dense"]
    assert hf.config.structures["layers.0.attn.q"]["kind"] == "sparse"
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-4)
