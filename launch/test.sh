#!/usr/bin/env bash
# Set up the environment and run the test suite (arguments go to pytest).
#
# Usage: bash launch/test.sh                 everything (a few minutes)
#        bash launch/test.sh -m "not slow"   the quick subset
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
set -euo pipefail
ruff check .
# pytest exits 5 when it collects no test: that fails here like any other error.
python -m pytest -q "$@"
