"""Export a checkpoint to Hugging Face: a standard ``LlamaForCausalLM`` with densified weights, or the structured
model with its own remote code.

Usage:
    python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints --out runs/tiny-cpu/hf
    python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints --out runs/tiny-cpu/hf-structured \
        --format structured
    python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints/step_000300 --out hf/ --overwrite

``--format dense`` (default): every structured projection is written as its exact dense matrix
(``applied_dense``: ``to_dense``, mixed with a self-guided dense path while one is live), so the result loads in
vanilla ``transformers`` with no remote code.

``--format structured``: the safetensors keep every structured factor and the kept values of sparse projections
(with their positions), beside a self-contained ``configuration_structorch.py`` and ``modeling_structorch.py``
(torch and transformers only) and an ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` loads it with our parameter count; ``generate`` and its KV cache are Llama's. A live
self-guided dense path is refused (export after it ends, or use the dense format).

Either way the tokenizer the model was trained with (sentencepiece or tokenizers) is exported beside it, and
before anything is moved into ``--out`` the exported model is reloaded with ``AutoModelForCausalLM`` and its
logits are compared with ours on a sample batch; a mismatch aborts.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model.config import SLOTS
from model.gpt import GPT
from pretrain.checkpoint import load_model
from pretrain.config import UserError
from pretrain.tokenizer import TokenizerError, read_tokenizer

HF_GROUPS = {"attn": "self_attn", "mlp": "mlp"}
"""Hugging Face Llama's module of each slot group (``model.layers.N.self_attn.q_proj``, ``...mlp.up_proj``)."""


def hf_names(n_layers: int, tied: bool) -> dict[str, str]:
    """Hugging Face Llama's name of every tensor, by our name (each projection as its dense ``<proj>.weight``);
    the one map the export and the import (``tools/convert_from_hf.py``) share."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not tied:
        names["output.weight"] = "lm_head.weight"
    for i in range(n_layers):
        pre = f"model.layers.{i}"
        for slot, s in SLOTS.items():
            names[f"layers.{i}.{s.group}.{slot}.weight"] = f"{pre}.{HF_GROUPS[s.group]}.{slot}_proj.weight"
        names[f"layers.{i}.attn_norm.weight"] = f"{pre}.input_layernorm.weight"
        names[f"layers.{i}.mlp_norm.weight"] = f"{pre}.post_attention_layernorm.weight"
    return names


def llama_state_dict(model: GPT, projections: bool = True) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face Llama names, structured projections densified (left out when not
    ``projections``)."""
    layers = model.structured_layers()
    sd = {}
    for ours, theirs in hf_names(model.cfg.n_layers, model.cfg.tie_embeddings).items():
        layer = layers.get(ours.removesuffix(".weight"))
        if layer is None:
            sd[theirs] = model.get_parameter(ours)
        elif projections:
            sd[theirs] = layer.applied_dense()
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def llama_config(model: GPT, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    c = model.cfg
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                       num_key_value_heads=c.kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_seq_len,
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                       attention_bias=False, mlp_bias=False, bos_token_id=bos_id, eos_token_id=eos_id,
                       hidden_act="silu")


REMOTE = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_structorch.py", "modeling_structorch.py")
SPARSE_KINDS = ("nm", "blocksparse")
"""Kinds exported as their kept values and flat positions (``dense`` too when it carries a pruning mask)."""


def structured_projection(layer) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(kind, parameters, buffers, hyper-parameters)`` of one projection for the remote code."""
    if getattr(layer, "guide", None) is not None:
        raise UserError("a self-guided dense path is still live in this checkpoint; export a step after the "
                        "guide ends, or use --format dense")
    kind = layer.name
    if kind in SPARSE_KINDS or (kind == "dense" and layer.mask is not None):
        w = layer.to_dense().detach().flatten()
        idx = w.nonzero().flatten()
        return "sparse", {"values": w[idx]}, {"indices": idx}, {}
    tensors = {n: p.detach() for n, p in layer.named_parameters()}
    if kind == "dense":
        return kind, tensors, {}, {}
    if kind == "lowrank":
        return kind, {"u": tensors["u"], "v": tensors["v"]}, {}, {}
    if kind == "sparse_lowrank":
        return kind, {k: tensors[k] for k in ("u", "v", "values")}, {"indices": layer.indices}, {"scale": layer.scale}
    if kind == "blockdiag":
        return kind, {"weight": tensors["weight"]}, {}, {"shuffle": bool(layer.shuffle)}
    if kind == "monarch":
        return kind, {"l": tensors["l"], "r": tensors["r"]}, {}, {"blocks": layer.blocks, "rank": layer.rank}
    if kind == "blast":
        return kind, {k: tensors[k] for k in ("u", "s", "v")}, {}, {}
    raise UserError(f"structure {kind!r} has no structured export; use --format dense")


def structured_model(model: GPT, bos_id: int, eos_id: int):
    """The remote-code model (built from tools/hf_remote) holding our tensors under Hugging Face names."""
    from tools.hf_remote.configuration_structorch import StructorchConfig
    from tools.hf_remote.modeling_structorch import StructorchForCausalLM

    structures, sd = {}, {}
    for name, layer in model.structured_layers().items():
        _, i, group, slot = name.split(".")
        kind, params, buffers, hparams = structured_projection(layer)
        structures[name] = {"kind": kind, "in": layer.in_features, "out": layer.out_features, "hparams": hparams,
                            "params": {k: list(v.shape) for k, v in params.items()},
                            "buffers": {k: list(v.shape) for k, v in buffers.items()}}
        pre = f"model.layers.{i}.{HF_GROUPS[group]}.{slot}_proj"
        sd.update({f"{pre}.{k}": v for k, v in {**params, **buffers}.items()})
    dense = llama_state_dict(model, projections=False)
    base = llama_config(model, bos_id, eos_id).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        base.pop(key, None)
    config = StructorchConfig(structures=structures, **base)
    config.auto_map = {"AutoConfig": "configuration_structorch.StructorchConfig",
                       "AutoModelForCausalLM": "modeling_structorch.StructorchForCausalLM"}
    config.architectures = ["StructorchForCausalLM"]
    hf = StructorchForCausalLM(config)
    state = {**dense, **{k: v.float().contiguous().clone() if v.is_floating_point() else v.clone()
                         for k, v in sd.items()}}
    return hf, state


def export_llama(checkpoint: str | Path, out: str | Path, overwrite: bool = False, tolerance: float = 1e-4,
                 fmt: str = "dense") -> dict:
    """Write and verify the Hugging Face export (``fmt``: dense or structured); returns a report with the logit
    difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    model, cfg, step_dir = load_model(checkpoint)
    try:
        ours_tok = read_tokenizer(step_dir)
    except TokenizerError as e:
        raise UserError(f"the checkpoint's tokenizer: {e}") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp) / "hf"
        if fmt == "structured":
            hf, state = structured_model(model, ours_tok.bos_id, ours_tok.eos_id)
        else:
            hf = LlamaForCausalLM(llama_config(model, ours_tok.bos_id, ours_tok.eos_id))
            state = llama_state_dict(model)
        missing, unexpected = hf.load_state_dict(state, strict=False)
        missing = [k for k in missing if "rotary_emb" not in k]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        hf.save_pretrained(staged, safe_serialization=True)
        if fmt == "structured":
            for name in REMOTE_FILES:
                shutil.copy(REMOTE / name, staged / name)

        remote = fmt == "structured"
        (staged / ours_tok.file_name).write_bytes(ours_tok.blob)
        if ours_tok.kind == "sentencepiece":
            (staged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
            tok = AutoTokenizer.from_pretrained(staged, add_bos_token=False, add_eos_token=False,
                                                trust_remote_code=remote)
        else:
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(staged / ours_tok.file_name), **ours_tok.special_tokens())
        tok.save_pretrained(staged)

        # Verify: vanilla transformers reload, same logits and same token ids as ours.
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32, trust_remote_code=remote).eval()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.model.max_seq_len)), generator=gen)
        with torch.no_grad():
            ours, theirs = model(tokens), reloaded(tokens).logits
        diff = float((ours - theirs).abs().max())
        scale = float(ours.abs().max())
        sample = "def greet(name):\n    return f'hello {name}!'  # 42\n"
        ids_ok = AutoTokenizer.from_pretrained(staged, trust_remote_code=remote).encode(
            sample, add_special_tokens=False) == ours_tok.encode([sample])[0]
        if diff > tolerance * max(1.0, scale) or not ids_ok:
            raise RuntimeError(f"verification failed: max |logit diff| = {diff:.3e} (scale {scale:.3g}), "
                               f"tokenizer ids equal: {ids_ok}; nothing written to {out}")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return {"checkpoint": str(step_dir), "out": str(out), "max_abs_logit_diff": diff, "logit_scale": scale,
            "params_dense": sum(p.numel() for p in hf.parameters()), "params_structured": model.num_params(),
            "format": fmt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="step directory, or a checkpoints root with 'latest'")
    ap.add_argument("--out", required=True, help="directory for the Hugging Face model")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max logit difference relative to logit scale")
    ap.add_argument("--format", choices=("dense", "structured"), default="dense",
                    help="dense: vanilla LlamaForCausalLM; structured: the factors, with remote code")
    args = ap.parse_args(argv)
    try:
        report = export_llama(args.checkpoint, args.out, args.overwrite, args.tolerance, args.format)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "StructorchForCausalLM with remote code" if args.format == "structured" else "LlamaForCausalLM"
    print(f"exported {report['checkpoint']} -> {report['out']} ({kind}, safetensors); "
          f"verified: max |logit diff| {report['max_abs_logit_diff']:.2e} at logit scale "
          f"{report['logit_scale']:.2f}; {report['params_structured']:,} structured parameters -> "
          f"{report['params_dense']:,} in the export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
