#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment in .venv and install structorch into it.
#
# Usage: source launch/setup.sh        (from the repository root; activates .venv)
#
# torch is pinned to 2.13.0 and installed first: on a CPU machine that takes the CPU build; an unpinned torch
# would pull gigabytes of CUDA wheels. On a GPU machine, install the CUDA build of torch 2.13.0 into .venv
# before running this and it is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
set +euo pipefail
