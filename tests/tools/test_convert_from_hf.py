"""Import from Hugging Face Llama: a random HF model's logits, our dense model's round trip, compression into
structures that training continues from, and the refusals."""

import json
import shutil

import pytest
import torch

from pretrain.checkpoint import load_model
from pretrain.config import UserError, load_config
from pretrain.train import Trainer
from tests.conftest import tiny_overrides
from tools.convert_from_hf import import_hf, main
from tools.convert_to_hf import export_llama


def _hf_llama(tmp_path, tiny_store, tied=False, bin_weights=False, **config):
    """A random ``LlamaForCausalLM`` saved locally with the store's tokenizer (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=tied, **config)
    model = LlamaForCausalLM(c).eval()
    with torch.no_grad():  # norms away from 1, so a transposed or swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path / "hf"
    model.save_pretrained(out, safe_serialization=not bin_weights)
    shutil.copy(tiny_store / "tokenizer.model", out / "tokenizer.model")
    return model, out


@pytest.mark.parametrize("tied,bin_weights", [(False, False), (True, True)])
def test_import_of_a_random_hf_llama_gives_its_logits(tiny_store, tmp_path, tied, bin_weights):
    hf, path = _hf_llama(tmp_path, tiny_store, tied, bin_weights)
    report = import_hf(path, None, tmp_path / "run", tiny_overrides(tiny_store, tmp_path / "unused"))
    ours, cfg, _ = load_model(report["step_dir"])
    assert cfg.model.tie_embeddings == tied and cfg.model.n_kv_heads == 2 and cfg.model.rope_theta == 5000.0
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert all(p["error"] < 1e-6 for p in report["projections"].values())  # dense: a copy


def test_round_trip_ours_to_hf_and_back_keeps_the_logits(tiny_store, tmp_path):
    over = tiny_overrides(tiny_store, tmp_path / "dense", **{"train.steps": 4})
    Trainer(load_config(None, over)).fit()
    export_llama(tmp_path / "dense" / "checkpoints", tmp_path / "hf")
    report = import_hf(tmp_path / "hf", None, tmp_path / "back", tiny_overrides(tiny_store, tmp_path / "unused"))
    before, _, _ = load_model(tmp_path / "dense" / "checkpoints")
    after, _, _ = load_model(report["step_dir"])
    tokens = torch.randint(0, before.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(after(tokens), before(tokens), rtol=0, atol=1e-5)
    assert report["val_after"] == pytest.approx(report["val_before"], abs=1e-5)


def test_compressed_import_reports_errors_and_training_continues(tiny_store, tmp_path, capsys):
    _, path = _hf_llama(tmp_path, tiny_store)
    spec = "{default: {kind: dense}, attn: {kind: lowrank, rank: 8}, mlp: {kind: blast, blocks: 4, rank: 8}}"
    over = [*tiny_overrides(tiny_store, tmp_path / "unused"), f"model.structure={spec}"]
    args = ["--hf", str(path), "--out", str(tmp_path / "run")]
    for o in over:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| layers.")]
    assert len(rows) == 2 * 7 and {r[2].strip() for r in rows} == {"lowrank", "blast"}
    assert all(0.0 < float(r[3]) < 1.0 and float(r[5]) < 1.0 for r in rows)  # lossy, and smaller
    assert "validation loss" in out and "continue: python -m pretrain.train" in out
    # training continues from the imported step (fresh optimizer state, step 0)
    cfg = load_config(tmp_path / "run" / "config.yaml", ["checkpoint.resume=auto", "train.steps=2"])
    trainer = Trainer(cfg)
    assert trainer.step == 0
    assert trainer.fit()["val/loss"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_000000"
    fresh = Trainer(load_config(tmp_path / "run" / "config.yaml",
                                [f"checkpoint.resume={ckpt}", "checkpoint.load_optimizer=false",
                                 f"train.out_dir={tmp_path / 'again'}", "train.steps=1"]))
    assert fresh.step == 0


@pytest.mark.parametrize("change,match", [
    ({"attention_bias": True}, r"attention_bias=True"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling="),
    ({"rope_parameters": {"rope_theta": 5e3, "rope_type": "linear", "factor": 2.0}}, r"rope_type='linear'"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, r"MistralForCausalLM.*allowed"),
])
def test_unsupported_features_are_named(tiny_store, tmp_path, change, match):
    _, path = _hf_llama(tmp_path, tiny_store)
    c = json.loads((path / "config.json").read_text())
    c.update(change)
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match=match):
        import_hf(path, None, tmp_path / "run", tiny_overrides(tiny_store, tmp_path / "unused"))


def test_the_store_must_hold_the_models_own_tokenizer(tiny_store, tmp_path):
    _, path = _hf_llama(tmp_path, tiny_store)
    over = tiny_overrides(tiny_store, tmp_path / "unused")
    (path / "tokenizer.model").write_bytes(b"not a tokenizer")
    with pytest.raises(UserError, match=r"no usable tokenizer .*not a sentencepiece model"):
        import_hf(path, None, tmp_path / "run", over)
    (path / "tokenizer.model").unlink()
    _bpe_tokenizer(path)  # a valid tokenizer.json: not the store's sentencepiece model
    with pytest.raises(UserError, match=r"not tokenized with .*tokenizer.json; prepare one with: .*--tokenizer"):
        import_hf(path, None, tmp_path / "run2", over)
    assert main(["--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def _bpe_tokenizer(directory):
    """A byte-level BPE ``tokenizer.json`` (the tokenizers library, as Llama 3 and most recent models ship) trained
    on a few standard-library modules, with a ``tokenizer_config.json`` naming its special tokens."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = sysconfig.get_paths()["stdlib"]
    texts = [open(f"{root}/{m}.py").read() for m in ("os", "json/__init__", "textwrap", "string", "shlex")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return tok.get_vocab_size()


def test_a_tokenizers_json_model_is_imported_trained_and_exported(tmp_path):
    """A model whose only tokenizer is a tokenizer.json: the store is prepared with it, the import reproduces the
    model's logits, and training then exporting carries the same tokenizer (the export checks its token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.prepare_data import main as prepare

    hf_dir = tmp_path / "hf"
    vocab = _bpe_tokenizer(hf_dir)
    store = tmp_path / "store"
    assert prepare(["--out", str(store), "--max-docs", "40", "--num-proc", "1", "--tokenizer", str(hf_dir)]) == 0
    assert (store / "tokenizer.json").is_file()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(hf_dir)
    report = import_hf(hf_dir, None, tmp_path / "run", tiny_overrides(store, tmp_path / "unused"))
    ours, _, step_dir = load_model(report["step_dir"])
    assert (step_dir / "tokenizer.json").is_file()
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    cfg = load_config(tmp_path / "run" / "config.yaml", ["checkpoint.resume=auto", "train.steps=2",
                                                          "checkpoint.interval=2"])
    Trainer(cfg).fit()
    export = export_llama(tmp_path / "run" / "checkpoints", tmp_path / "out")
    assert export["max_abs_logit_diff"] < 1e-4 * max(1.0, export["logit_scale"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()
