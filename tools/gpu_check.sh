#!/usr/bin/env bash
# One command that validates structorch on a machine with NVIDIA GPUs and writes one Markdown report.
#
# Usage (from anywhere):
#   bash tools/gpu_check.sh                       # everything; the report in runs/gpu-check/report.md
#   bash tools/gpu_check.sh --dry-run             # print every step it would run, run nothing
#   bash tools/gpu_check.sh --cuda cu126 --steps 100 --report /tmp/gpu.md
#
# Steps:
#   1. the CUDA build of torch 2.13.0 into .venv (from download.pytorch.org/whl/<--cuda>), then the project
#      (launch/setup.sh keeps that torch);
#   2. the token store data/stdlib, if missing (tools/prepare_data.py, the Python standard library);
#   3. the gpu-marked tests: every Triton kernel compiled for the GPU against the torch reference in fp32 and bf16,
#      compiled layers with the kernels inside one torch.compile graph, and with 2 or more GPUs NCCL tensor-parallel
#      loss equality against one GPU;
#   4. tools/bench_kernels.py in bf16 (each product's time against dense at the recipes' shapes);
#   5. a training benchmark per structure at the gpt2-small shape (tools/bench_structures.py, bf16): tokens/s,
#      MFU on the structure's FLOPs and on the executed FLOPs, peak memory, each against dense.
#   6. with 2 or more GPUs, memory per GPU of the native engine against DeepSpeed's ZeRO-1/2/3 and offload
#      (tools/bench_memory.py --device cuda --tables engines, bf16 and fp32, dp = 2 and 4 if there are 4 GPUs),
#      its plot beside the report.
# Each step's output goes into the report under its own heading; a failing step is recorded and the rest still run;
# the exit code is the number of failed steps (2 for bad arguments).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
CUDA=cu128
STEPS=200
REPORT=runs/gpu-check/report.md
DATA=data/stdlib
usage="usage: bash tools/gpu_check.sh [--dry-run] [--cuda cu126|cu128|cu130] [--steps N] [--report FILE] [--data DIR]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cuda) CUDA=${2:?--cuda needs a value}; shift ;;
    --steps) STEPS=${2:?--steps needs a value}; shift ;;
    --report) REPORT=${2:?--report needs a value}; shift ;;
    --data) DATA=${2:?--data needs a value}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "error: unknown argument $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
case "$CUDA" in cu[0-9][0-9][0-9]) ;; *) echo "error: --cuda $CUDA; expected cuNNN, e.g. cu128" >&2; exit 2 ;; esac
case "$STEPS" in ''|*[!0-9]*) echo "error: --steps $STEPS; expected a positive integer" >&2; exit 2 ;; esac

PY=.venv/bin/python
FAILED=0

step() {  # step "title" command...: print it; unless dry, run it and append its output to the report
  local title=$1; shift
  echo "+ [$title] $*"
  [ "$DRY" = 1 ] && return 0
  {
    echo; echo "## $title"; echo; echo '```'; echo "\$ $*"
  } >> "$REPORT"
  local out rc
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" | tail -n 200 >> "$REPORT"
  echo '```' >> "$REPORT"
  if [ $rc -ne 0 ]; then
    echo "**failed (exit $rc)**" >> "$REPORT"
    echo "   failed (exit $rc); see $REPORT" >&2
    FAILED=$((FAILED + 1))
  fi
  # tables (lines starting with |) are repeated outside the code block so the report renders them
  printf '%s\n' "$out" | grep '^|' >> "$REPORT" || true
}

if [ "$DRY" = 1 ]; then
  echo "dry run: nothing is executed; the report would be $REPORT"
  GPUS="N (from nvidia-smi -L)"
else
  if ! command -v nvidia-smi >/dev/null; then
    echo "error: nvidia-smi not found: this check needs NVIDIA GPUs (use --dry-run to see the steps)" >&2
    exit 2
  fi
  GPUS=$(nvidia-smi -L | grep -c '^GPU')
  mkdir -p "$(dirname "$REPORT")"
  { echo "# structorch GPU check"; echo; echo "$(date -u +%FT%TZ), $GPUS GPU(s), commit $(git rev-parse --short HEAD 2>/dev/null)"; echo; echo '```'; nvidia-smi -L; echo '```'; } > "$REPORT"
fi

step "python environment" bash -c "[ -x $PY ] || ${PYTHON:-python3} -m venv .venv"
step "torch 2.13.0 (CUDA build $CUDA)" bash -c "$PY -c 'import sys, torch; sys.exit(torch.version.cuda is None or \
  torch.__version__.split(\"+\")[0] != \"2.13.0\")' 2>/dev/null || $PY -m pip install --quiet --force-reinstall \
  torch==2.13.0 --index-url https://download.pytorch.org/whl/$CUDA"
step "structorch" bash -c "source launch/setup.sh && python -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), \"GPUs\")'"
step "token store" bash -c "[ -e $DATA ] || $PY tools/prepare_data.py --out $DATA --vocab-size 2048"
step "gpu tests (kernels fp32/bf16, compiled graphs, NCCL with >= 2 GPUs)" $PY -m pytest -q -m gpu tests
step "kernel benchmark (bf16)" $PY tools/bench_kernels.py --dtype bf16
step "training benchmark per structure, gpt2-small shape (bf16)" $PY tools/bench_structures.py \
  --config configs/gpt2-small-dense.yaml --steps "$STEPS" --data "$DATA" --set train.precision=bf16 \
  --set train.micro_batch=8 --set train.global_batch=8 --set data.seq_len=1024

if [ "$DRY" = 1 ] || [ "$GPUS" -ge 2 ]; then
  ENGINE_DP=2; [ "$DRY" = 0 ] && [ "$GPUS" -ge 4 ] && ENGINE_DP=2,4
  step "memory per GPU: native against DeepSpeed ZeRO-1/2/3 and offload (needs 2 GPUs)" $PY tools/bench_memory.py \
    --device cuda --tables engines --engine-dp "$ENGINE_DP" --engine-precisions bf16,fp32 \
    --plot-engines "$(dirname "$REPORT")/engines.png"
fi
if [ "$DRY" = 1 ]; then
  echo "GPUs: $GPUS; the NCCL loss-equality test runs when there are 2 or more"
  exit 0
fi
echo "report: $REPORT ($FAILED failed step(s))"
exit "$FAILED"
