"""Export a checkpoint to a standard Hugging Face ``LlamaForCausalLM`` (safetensors) with densified weights.

Usage:
    python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints --out runs/tiny-cpu/hf
    python tools/convert_to_hf.py --checkpoint runs/tiny-cpu/checkpoints/step_000300 --out hf/ --overwrite

Every structured projection is written as its exact dense matrix (``applied_dense``: ``to_dense``, mixed with
a self-guided dense path while one is live), so the result loads in
vanilla ``transformers`` with no remote code. The sentencepiece tokenizer the model was trained with is
exported beside it. Before anything is moved into ``--out``, the exported model is reloaded with
``AutoModelForCausalLM`` and its logits are compared with ours on a sample batch; a mismatch aborts.
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

HF_GROUPS = {"attn": "self_attn", "mlp": "mlp"}
"""Hugging Face Llama's module of each slot group (``model.layers.N.self_attn.q_proj``, ``...mlp.up_proj``)."""


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face Llama names, structured projections densified."""
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, block in model.layers.items():
        pre = f"model.layers.{i}"
        for name, _, layer in block.projections():
            sd[f"{pre}.{HF_GROUPS[SLOTS[name].group]}.{name}_proj.weight"] = layer.applied_dense()
        sd[f"{pre}.input_layernorm.weight"] = block.attn_norm.weight
        sd[f"{pre}.post_attention_layernorm.weight"] = block.mlp_norm.weight
    if not model.cfg.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
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


def export_llama(checkpoint: str | Path, out: str | Path, overwrite: bool = False, tolerance: float = 1e-4) -> dict:
    """Write and verify the Hugging Face export; returns a report with the logit difference."""
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    model, cfg, step_dir = load_model(checkpoint)
    tokenizer_file = step_dir / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise UserError(f"{step_dir}: no tokenizer.model in the checkpoint")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        staged = Path(tmp) / "hf"
        hf = LlamaForCausalLM(llama_config(model, sp.bos_id(), sp.eos_id()))
        missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
        missing = [k for k in missing if "rotary_emb" not in k]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
        hf.save_pretrained(staged, safe_serialization=True)

        shutil.copy(tokenizer_file, staged / "tokenizer.model")
        (staged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        tok = AutoTokenizer.from_pretrained(staged, add_bos_token=False, add_eos_token=False)
        tok.save_pretrained(staged)

        # Verify: vanilla transformers reload, same logits and same token ids as ours.
        reloaded = AutoModelForCausalLM.from_pretrained(staged, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.model.max_seq_len)), generator=gen)
        with torch.no_grad():
            ours, theirs = model(tokens), reloaded(tokens).logits
        diff = float((ours - theirs).abs().max())
        scale = float(ours.abs().max())
        sample = "def greet(name):\n    return f'hello {name}!'  # 42\n"
        ids_ok = AutoTokenizer.from_pretrained(staged).encode(sample, add_special_tokens=False) == sp.encode(sample)
        if diff > tolerance * max(1.0, scale) or not ids_ok:
            raise RuntimeError(f"verification failed: max |logit diff| = {diff:.3e} (scale {scale:.3g}), "
                               f"tokenizer ids equal: {ids_ok}; nothing written to {out}")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return {"checkpoint": str(step_dir), "out": str(out), "max_abs_logit_diff": diff, "logit_scale": scale,
            "params_dense": sum(p.numel() for p in hf.parameters()), "params_structured": model.num_params()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="step directory, or a checkpoints root with 'latest'")
    ap.add_argument("--out", required=True, help="directory for the Hugging Face model")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max logit difference relative to logit scale")
    args = ap.parse_args(argv)
    try:
        report = export_llama(args.checkpoint, args.out, args.overwrite, args.tolerance)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {report['checkpoint']} -> {report['out']} (LlamaForCausalLM, safetensors); "
          f"verified: max |logit diff| {report['max_abs_logit_diff']:.2e} at logit scale "
          f"{report['logit_scale']:.2f}; {report['params_structured']:,} structured -> "
          f"{report['params_dense']:,} dense parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
