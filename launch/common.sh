# Shared by launch/torchrun.sh and launch/deepspeed.sh (sourced with the caller's arguments): ``--dry-run`` as the
# first argument (or DRY_RUN=1) sets dry=1 and is removed; NPROC defaults to the GPUs (1 without); OMP_NUM_THREADS
# defaults to 1 per process.
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ "${DRY_RUN:-0}" = 1 ] && dry=1
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
