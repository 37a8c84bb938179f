#!/usr/bin/env bash
# Tile scenes into a patch HDF5 over the boards of a hostfile (one rank per slot).
#
#   [HOSTFILE=FILE] [NP=N] slurm/tx2/run_preprocess.sh INPUT_DIR OUTPUT.h5 [hpcsrl-preprocess options]
#
# Settings (HOSTFILE, NP, HPCSRL_IFACE, HPCSRL_BTL, HPCSRL_MPIRUN_ARGS, HPCSRL_VENV) as in
# slurm/tx2/launch.sh. Paths must be valid on every board (a shared folder) for input and output.
# Exit codes: 2 usage / bad input path, 3 environment, otherwise the preprocessing's.
set -euo pipefail
HPCSRL_HOME=${HPCSRL_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source-path=SCRIPTDIR source=../env.sh  # the checkout's slurm/env.sh
source "$HPCSRL_HOME/slurm/env.sh"
hpcsrl_need_args 2 $# "${BASH_SOURCE[0]}"
[[ -e $1 ]] || hpcsrl_die 2 "INPUT_DIR '$1' does not exist"
input=$1
output=$2
shift 2
hpcsrl_require hpcsrl-preprocess
exec "$HPCSRL_HOME/slurm/tx2/launch.sh" hpcsrl-preprocess --input "$input" --output "$output" "$@"
