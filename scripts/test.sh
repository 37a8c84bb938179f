#!/usr/bin/env bash
# The README's test command (after `make install`): lint (ruff, shellcheck), then the whole suite,
# mpi and slurm tests included, in strict mode: a test whose MPI / Horovod / Slurm stack is missing
# fails instead of skipping (tests/conftest.py), so a broken install cannot pass by skipping.
# pytest's exit code 5 (no tests collected) is a failure here, as any non-zero code is.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${HPCSRL_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export HPCSRL_STRICT=1
echo "[test] ruff check"
ruff check .
echo "[test] shellcheck"
if ! command -v shellcheck >/dev/null; then
  echo "[test] ERROR: shellcheck not found (Debian package shellcheck; scripts/install.sh adds it as root)" >&2
  exit 1
fi
# -x follows the scripts' `source` of slurm/env.sh, which is linted as a file of its own too.
shellcheck -x slurm/*.sbatch slurm/env.sh slurm/tx2/*.sh scripts/*.sh
echo "[test] pytest (strict: HPCSRL_STRICT=1)"
exec python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 "$@"
