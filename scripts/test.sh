#!/usr/bin/env bash
# The README's test command (after `make install`): lint, then the whole suite, mpi and slurm tests included.
# pytest's exit code 5 (no tests collected) is a failure here, as any non-zero code is.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${HPCSRL_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
exec python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "$@"
