"""Inspect a checkpoint: step, topology, consumed samples, config diff, tensors and manifest verification.

Usage:
    python tools/inspect_checkpoint.py runs/tiny-cpu/checkpoints                 (the newest step)
    python tools/inspect_checkpoint.py runs/tiny-cpu/checkpoints/step_000300 --recipe configs/tiny-cpu.yaml
    python tools/inspect_checkpoint.py CKPT --tensors optim --json               (machine-readable)

Reads only metadata (meta.json, the manifest and DCP's .metadata through the restricted unpickler) and, with
verification on (the default), hashes every file against the manifest. Tensors are listed with their global
shape, dtype and placement as saved (``Shard(dim) x n`` from the chunk layout, or ``replicated``).
Exit codes: 0 intact, 1 verification found damage (each file named), 2 bad input.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pretrain.checkpoint import (
    CheckpointError,
    check_files,
    config_diff,
    read_dcp_metadata,
    read_manifest,
    read_meta,
    resolve_step_dir,
)
from pretrain.config import UserError, load_config, to_dict


def placement(chunks, size) -> str:
    """``replicated`` for one whole chunk, else ``Shard(dim) x n`` for chunks that split one dimension."""
    if len(chunks) == 1 and list(chunks[0].sizes) == list(size):
        return "replicated"
    split = {d for c in chunks for d, (o, s) in enumerate(zip(c.offsets, c.sizes)) if s != size[d] or o}
    return f"Shard({','.join(map(str, sorted(split)))}) x {len(chunks)}"


def tensors(step_dir: Path, prefix: str = "") -> list[dict]:
    """Every tensor DCP saved under ``prefix``: name, global shape, dtype, placement, bytes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = []
    for fqn, md in sorted(read_dcp_metadata(step_dir).state_dict_metadata.items()):
        if not fqn.startswith(prefix) or not isinstance(md, TensorStorageMetadata):
            continue
        dtype = md.properties.dtype
        numel = math.prod(md.size)
        out.append({"name": fqn, "shape": list(md.size), "dtype": str(dtype).removeprefix("torch."),
                    "placement": placement(md.chunks, md.size), "bytes": numel * dtype.itemsize})
    return out


def inspect(path: str | Path, recipe: str | None = None, overrides: tuple[str, ...] = (), verify: bool = True,
            prefix: str = "") -> dict:
    """The report ``main`` prints (a dict, JSON-serialisable)."""
    step_dir = resolve_step_dir(path)
    meta = read_meta(step_dir)
    report = {"step_dir": str(step_dir), "step": meta["step"], "consumed_samples": meta["consumed_samples"],
              "topology": meta.get("topology", {}), "format": meta.get("format", "unknown")}
    manifest = read_manifest(step_dir)
    files = manifest["files"]
    report["files"] = len(files)
    report["bytes"] = sum(f["size"] for f in files.values())
    if verify:
        start = time.perf_counter()
        problems = check_files(step_dir, manifest, sorted(files))
        seconds = time.perf_counter() - start
        report["verify"] = {"problems": problems, "seconds": seconds,
                            "ms_per_gb": 1e3 * seconds / max(report["bytes"] / 1e9, 1e-12)}
    if recipe is not None:
        want = to_dict(load_config(recipe, list(overrides)))
        if want["model"]["vocab_size"] is None:  # null: the trainer fills it from the token store
            want["model"]["vocab_size"] = meta["config"]["model"]["vocab_size"]
        report["config_diff"] = [d.replace(", config has ", ", recipe has ")
                                 for d in config_diff(meta["config"], want, "")]
    report["tensors"] = tensors(step_dir, prefix)
    return report


def print_report(r: dict) -> None:
    topo = r["topology"]
    print(f"{r['step_dir']}\n  step {r['step']}, {r['consumed_samples']:,} samples consumed, written at "
          f"dp={topo.get('dp')} tp={topo.get('tp')} pp={topo.get('pp')} ({r['format']})")
    print(f"  {r['files']} files, {r['bytes'] / 1e6:,.2f} MB")
    if "verify" in r:
        v = r["verify"]
        status = "intact" if not v["problems"] else "DAMAGED:\n    " + "\n    ".join(v["problems"])
        print(f"  manifest: {status} (verified in {v['seconds'] * 1e3:.1f} ms, {v['ms_per_gb']:.0f} ms/GB)")
    if "config_diff" in r:
        diff = r["config_diff"]
        print("  config vs recipe: " + ("identical" if not diff else f"{len(diff)} difference(s)\n    "
                                        + "\n    ".join(diff)))
    print("\n| tensor | shape | dtype | placement | MB |\n|---|---|---|---|---|")
    for t in r["tensors"]:
        print(f"| {t['name']} | {tuple(t['shape'])} | {t['dtype']} | {t['placement']} | {t['bytes'] / 1e6:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step directory, or a checkpoints root (its newest step)")
    ap.add_argument("--recipe", help="YAML recipe to diff the checkpoint's config against")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override applied to --recipe before the diff (repeatable)")
    ap.add_argument("--tensors", default="", metavar="PREFIX", help="list only tensors under PREFIX (model, optim)")
    ap.add_argument("--no-verify", action="store_true", help="skip hashing the files against the manifest")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        report = inspect(args.checkpoint, args.recipe, tuple(args.overrides), not args.no_verify, args.tensors)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 1 if report.get("verify", {}).get("problems") else 0


if __name__ == "__main__":
    sys.exit(main())
