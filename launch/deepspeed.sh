#!/usr/bin/env bash
# Launch pretrain.train with DeepSpeed's launcher and parallel.engine=deepspeed (ZeRO over the dp group).
#
# Usage:
#   NPROC=2 bash launch/deepspeed.sh --config configs/tiny-cpu.yaml --set parallel.dp=2 --set parallel.deepspeed.zero_stage=3
#   HOSTFILE=hosts bash launch/deepspeed.sh --config configs/gpt2-small-blast.yaml --set parallel.dp=16
#   HOSTFILE=hosts INCLUDE="node1:0,1@node2" bash launch/deepspeed.sh ...     (or EXCLUDE="node1:3")
#   HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node1 bash launch/deepspeed.sh ...   (no ssh: run it on every node)
#   bash launch/deepspeed.sh --dry-run ...      print the exact command instead of running it
#
# Environment: NPROC (processes per node, default: the GPUs, 1 without), HOSTFILE (multi-node: DeepSpeed's hostfile,
# "host slots=N" per line; it reaches the other nodes over ssh), INCLUDE / EXCLUDE (DeepSpeed's host:slot filters,
# with a hostfile), NNODES, MASTER_ADDR, MASTER_PORT, NODE_RANK (DeepSpeed's --no_ssh mode: the same command runs
# on every node of the hostfile, each with its own NODE_RANK, as under a scheduler without ssh between nodes;
# needs HOSTFILE and MASTER_ADDR). Every rank gets parallel.engine=deepspeed; the world size
# must equal parallel.dp x parallel.tp (pp stays 1 with this engine).
# On CPU use NPROC (DeepSpeed's --include localhost:0,1 needs GPUs, a hostfile needs ssh even for localhost).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
case "$NPROC" in ''|*[!0-9]*|0) echo "error: NPROC=$NPROC; expected a positive integer" >&2; exit 2 ;; esac
if [ -n "${INCLUDE:-}${EXCLUDE:-}" ] && [ -z "${HOSTFILE:-}" ]; then
  echo "error: INCLUDE/EXCLUDE filter a hostfile's slots; set HOSTFILE too" >&2; exit 2
fi
if [ -n "${NODE_RANK:-}" ]; then
  case "$NODE_RANK" in *[!0-9]*) echo "error: NODE_RANK=$NODE_RANK; expected a node index 0, 1, ..." >&2; exit 2 ;; esac
  if [ -z "${HOSTFILE:-}" ] || [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: NODE_RANK (a launch without ssh) needs HOSTFILE and MASTER_ADDR too" >&2; exit 2
  fi
fi
if [ -n "${HOSTFILE:-}" ] && [ ! -f "$HOSTFILE" ]; then
  echo "error: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2
fi
cmd=(deepspeed)
if [ -n "${HOSTFILE:-}" ]; then
  cmd+=(--hostfile "$HOSTFILE")
  [ -n "${INCLUDE:-}" ] && cmd+=(--include "$INCLUDE")
  [ -n "${EXCLUDE:-}" ] && cmd+=(--exclude "$EXCLUDE")
  [ -n "${NNODES:-}" ] && cmd+=(--num_nodes "$NNODES")
  [ -n "${NODE_RANK:-}" ] && cmd+=(--no_ssh --node_rank "$NODE_RANK")
else
  cmd+=(--num_gpus "$NPROC")
fi
[ -n "${MASTER_ADDR:-}" ] && cmd+=(--master_addr "$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && cmd+=(--master_port "$MASTER_PORT")
cmd+=(--no_local_rank --module pretrain.train "$@" --set parallel.engine=deepspeed)
if [ "$dry" = 1 ]; then
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${cmd[@]}")"
  exit 0
fi
exec "${cmd[@]}"
