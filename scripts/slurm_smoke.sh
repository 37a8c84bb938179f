#!/usr/bin/env bash
# The Slurm path end to end on one machine (as root): a private one-node Slurm (munged, slurmctld,
# slurmd in a temp folder; see tests/slurm/cluster.py), synthetic scenes, then
# `sbatch --wait slurm/preprocess.sbatch` with 2 ranks started by srun --mpi=pmix.
#
#   scripts/slurm_smoke.sh [OUT_DIR]      (default: a temp folder, removed afterwards)
#
# Prints the job's log and exits with the job's exit code (3: the cluster did not start).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HPCSRL_VENV:-$ROOT/.venv}
export PATH="$VENV/bin:$PATH" OMP_NUM_THREADS=1
if [[ -n ${1:-} ]]; then
  OUT=$(mkdir -p "$1" && cd "$1" && pwd)
else
  OUT=$(mktemp -d)
  trap 'rm -rf "$OUT"' EXIT
fi
cd "$OUT"
echo "[slurm-smoke] synthetic scenes in $OUT/scenes"
hpcsrl synth --out scenes --scenes 4 --size 240 --size-spread 0.5 --classes 4 --seed 0 --force
rc=0
timeout 600 python "$ROOT/tests/slurm/cluster.py" --cpus 4 -- \
  sbatch --wait --ntasks=2 --output="$OUT/preprocess.out" \
  "$ROOT/slurm/preprocess.sbatch" scenes patches.h5 --patch-size 60 || rc=$?
echo "[slurm-smoke] job log:"
cat "$OUT/preprocess.out" 2>/dev/null || echo "(no job log)"
echo "[slurm-smoke] exit code $rc"
exit "$rc"
