"""Import a local Hugging Face Llama checkpoint into a structorch run, compressing projections into structures.

Usage:
    python tools/convert_from_hf.py --hf runs/tiny-cpu-dense/hf --config configs/compress/blast-half.yaml \
        --out runs/compress-blast
    python -m pretrain.train --config runs/compress-blast/config.yaml --resume auto     # continue pretraining

``--hf`` is a directory with a Llama ``config.json`` and its weights (``*.safetensors``, sharded or not, or
``pytorch_model*.bin``); GQA, tied or untied embeddings and the RoPE base are read from the config. The run
takes everything else from ``--config`` (and ``--set`` overrides): ``model.structure`` says which projections
become which structure; the model's shape comes from the Hugging Face config. Every projection goes through its
structure's ``from_dense``; the tool prints each projection's relative projection error and parameter reduction,
and the validation loss on the run's token store before (the dense model) and after compression.

The result is ``OUT/config.yaml`` and ``OUT/checkpoints/step_000000``, an ordinary step directory with a zero
optimizer state: ``--resume auto`` (or ``--resume OUT/checkpoints/step_000000 --set
checkpoint.load_optimizer=false``) continues from it. The token store must be tokenized with the model's own
tokenizer, its sentencepiece ``tokenizer.model`` or else its ``tokenizer.json`` (``tools/prepare_data.py
--tokenizer HF``). Refused, with the feature named: other architectures, biases, activations other than SiLU, RoPE
scaling, sliding windows, and a ``head_dim`` other than ``hidden_size / num_attention_heads``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import StructureSpec
from model.gpt import GPT
from model.structured import spec_params, structure_class
from pretrain.config import ConfigError, UserError, load_config
from pretrain.tokenizer import TokenizerError, read_tokenizer
from pretrain.train import Trainer
from tools.convert_to_hf import hf_names

SUPPORTED = ("LlamaForCausalLM",)


def read_hf_config(hf: Path) -> dict:
    """``config.json`` of a Llama checkpoint, checked for features we cannot represent."""
    path = hf / "config.json"
    if not path.is_file():
        raise UserError(f"--hf {hf}: no config.json")
    c = json.loads(path.read_text())
    arch = c.get("architectures") or [c.get("model_type", "?")]
    if c.get("model_type") != "llama" or not set(arch) <= set(SUPPORTED):
        raise UserError(f"{path}: architecture {arch} (model_type {c.get('model_type')!r}) is not supported; "
                        f"allowed: {list(SUPPORTED)}")
    rope = c.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here; 4 at the top level
    refused = {"attention_bias": bool(c.get("attention_bias")), "mlp_bias": bool(c.get("mlp_bias")),
               "rope_scaling": c.get("rope_scaling") is not None,
               "sliding_window": c.get("sliding_window") is not None,
               "hidden_act": c.get("hidden_act", "silu") != "silu"}
    bad = [f"{k}={c.get(k)!r}" for k, v in refused.items() if v]
    if rope.get("rope_type", "default") != "default":
        bad.append(f"rope_parameters.rope_type={rope['rope_type']!r} (RoPE scaling)")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        bad.append(f"head_dim={c['head_dim']} (not hidden_size / num_attention_heads)")
    if bad:
        raise UserError(f"{path}: unsupported feature(s) {', '.join(bad)}; structorch's Llama has no biases, SiLU "
                        "gates and plain RoPE")
    return c


def rope_theta(c: dict) -> float:
    return float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def model_overrides(c: dict) -> list[str]:
    """Our ``model.*`` settings for the Hugging Face config ``c``."""
    return [f"model.vocab_size={c['vocab_size']}", f"model.d_model={c['hidden_size']}",
            f"model.n_layers={c['num_hidden_layers']}", f"model.n_heads={c['num_attention_heads']}",
            f"model.n_kv_heads={c.get('num_key_value_heads') or c['num_attention_heads']}",
            f"model.d_ff={c['intermediate_size']}", f"model.max_seq_len={c.get('max_position_embeddings', 2048)}",
            f"model.rope_theta={rope_theta(c)}",
            f"model.norm_eps={float(c.get('rms_norm_eps', 1e-5))}",
            f"model.tie_embeddings={str(bool(c.get('tie_word_embeddings', False))).lower()}"]


def read_hf_weights(hf: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (safetensors preferred; ``.bin`` loaded with ``weights_only``)."""
    files = sorted(hf.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    files = sorted(hf.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"--hf {hf}: no *.safetensors or pytorch_model*.bin weights")
    out = {}
    for f in files:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def our_state_dict(hf_sd: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names -> ours (projections as dense ``weight``); a leftover tensor is an error."""
    names = {theirs: ours for ours, theirs in hf_names(n_layers, tied).items()}
    missing = sorted(set(names) - set(hf_sd))
    extra = sorted(k for k in set(hf_sd) - set(names) if not k.endswith("rotary_emb.inv_freq")
                   and not (tied and k == "lm_head.weight"))
    if missing or extra:
        raise UserError(f"weights do not match a Llama of this config: missing {missing[:4]}, unsupported "
                        f"{extra[:4]}{' (biases are not supported)' if any('bias' in k for k in extra) else ''}")
    return {ours: hf_sd[theirs].float() for theirs, ours in names.items()}


def check_tokenizer(hf: Path, corpus, data_paths: list[str]) -> None:
    """The run's token store must hold the model's own tokenizer (``tokenizer.model`` first, else
    ``tokenizer.json``)."""
    try:
        theirs = read_tokenizer(hf)
    except TokenizerError as e:
        raise UserError(f"--hf {hf}: no usable tokenizer ({e})") from None
    if theirs.kind != corpus.tokenizer_kind or theirs.blob != corpus.tokenizer_model:
        raise UserError(f"the token store(s) {data_paths} were not tokenized with {hf / theirs.file_name}; prepare "
                        f"one with: python tools/prepare_data.py --out DIR --tokenizer {hf}")


def dense_config(cfg):
    """``cfg.model`` with every projection dense."""
    from dataclasses import replace

    return replace(cfg.model, structure={"default": StructureSpec()})


def import_hf(hf: str | Path, recipe: str | Path | None, out: str | Path, overrides: list[str] = ()) -> dict:
    hf, out = Path(hf), Path(out)
    start = time.perf_counter()
    c = read_hf_config(hf)
    cfg = load_config(recipe, [*overrides, *model_overrides(c), f"train.out_dir={out}", "checkpoint.resume=none"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise UserError("convert_from_hf runs on one process (it writes a checkpoint any topology resumes)")
    trainer = Trainer(cfg)
    check_tokenizer(hf, trainer.corpus, cfg.data.paths)
    sd = our_state_dict(read_hf_weights(hf), c["num_hidden_layers"], cfg.model.tie_embeddings)

    dense = GPT(dense_config(cfg))
    dense.init_weights(0)
    dense_sd = dense.state_dict()
    for k, v in sd.items():
        dense_sd[k].copy_(v)
    t = cfg.train
    x, y = trainer.corpus.val.batch(0, t.eval_batches * t.micro_batch)
    with torch.no_grad():
        before = float(dense.eval()(x, y))

    model = trainer.model.stages[0]
    layers = model.structured_layers()
    report = {}
    target = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in sd.items():
            if name in target:  # embeddings, norms, head, and dense projections' weights
                target[name].copy_(tensor)
        for name, layer in layers.items():
            w = sd[f"{name}.weight"]
            spec = layer_spec(cfg.model, name)
            new = structure_class(spec.kind).from_dense(w, **spec_params(spec))
            for key, value in new.state_dict().items():
                target[f"{name}.{key}"].copy_(value)
            report[name] = {"kind": spec.kind, "error": float(new.projection_error),
                            "dense": w.numel(), "params": layer.num_params()}
    after = trainer.evaluate()
    trainer.out.mkdir(parents=True, exist_ok=True)
    from pretrain.config import dump_config

    (trainer.out / "config.yaml").write_text(dump_config(cfg))
    step_dir = trainer.save()
    return {"projections": report, "val_before": before, "val_after": after, "step_dir": str(step_dir),
            "params_dense": dense.num_params(), "params": model.num_params(), "seconds": time.perf_counter() - start}


def layer_spec(model_cfg, name: str) -> StructureSpec:
    """The structure spec of projection ``name`` (``layers.<i>.<group>.<slot>``)."""
    return model_cfg.spec_for(name.rsplit(".", 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="local Hugging Face Llama directory (config.json + weights)")
    ap.add_argument("--config", default=None, help="recipe for the run (structure, data, training); the model "
                                                   "shape comes from --hf")
    ap.add_argument("--out", required=True, help="run directory to create (config.yaml, checkpoints/step_000000)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override, e.g. "
                    "'model.structure={default: {kind: dense}, mlp: {kind: blast, blocks: 4, rank: 16}}'")
    args = ap.parse_args(argv)
    try:
        r = import_hf(args.hf, args.config, args.out, args.overrides)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| projection | structure | projection error | parameters | of dense |")
    print("|---|---|---|---|---|")
    for name, p in r["projections"].items():
        print(f"| {name} | {p['kind']} | {p['error']:.4f} | {p['params']:,} | {p['params'] / p['dense']:.3f} |")
    print(f"\nparameters {r['params_dense']:,} dense -> {r['params']:,} ({r['params'] / r['params_dense']:.3f}); "
          f"validation loss {r['val_before']:.4f} dense -> {r['val_after']:.4f} after compression; "
          f"wrote {r['step_dir']} in {r['seconds']:.1f} s\n"
          f"continue: python -m pretrain.train --config {Path(args.out) / 'config.yaml'} --resume auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
