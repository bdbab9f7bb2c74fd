"""Generate text with an exported model using plain ``transformers`` (no structorch code involved).

Usage:
    python tools/hf_generate.py --model runs/tiny-cpu/hf --prompt "def main(" --max-new-tokens 48
    python tools/hf_generate.py --model runs/tiny-cpu/hf-structured --trust-remote-code   # the structured export
"""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="directory written by tools/convert_to_hf.py")
    ap.add_argument("--prompt", default="import ", help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="run the export's own modeling code (needed for --format structured exports)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    remote = args.trust_remote_code
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=remote)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=remote).eval()
    inputs = tok(args.prompt, return_tensors="pt", add_special_tokens=False)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tok.eos_token_id, **sampling)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
