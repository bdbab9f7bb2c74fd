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
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ "${DRY_RUN:-0}" = 1 ] && dry=1
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=(python -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m pretrain.train "$@")
if [ "$dry" = 1 ]; then
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
  exit 0
fi
exec "${cmd[@]}"
