#!/usr/bin/env bash
# Single-node launch: NPROC processes of pretrain.train (gloo on CPU, NCCL on GPUs).
#
# Usage:
#   NPROC=8 bash launch/torchrun.sh --config configs/tiny-cpu.yaml \
#       --set parallel.dp=2 --set parallel.tp=2 --set parallel.pp=2 [--resume auto]
#   bash launch/torchrun.sh --dry-run ...      print the exact command instead of running it
#
# NPROC defaults to the number of GPUs (1 without GPUs); it must equal parallel.dp x tp x pp.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
cmd=(python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m pretrain.train "$@")
if [ "$dry" = 1 ]; then
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
  exit 0
fi
exec "${cmd[@]}"
