#!/usr/bin/env bash
# DHP hybrid-parallel training of a CWB plan over the boards of a hostfile: one rank per board
# (slots=1 each), as many boards as the plan's replicas in all (a 3/2/1 plan: 6), TCP transport.
#
#   [HOSTFILE=FILE] [NP=N] slurm/tx2/run_dhp.sh PLAN.json DATA.h5 OUT_DIR [hpcsrl dhp options]
#
# Settings (HOSTFILE, NP, HPCSRL_IFACE, HPCSRL_BTL, HPCSRL_MPIRUN_ARGS, HPCSRL_VENV) as in
# slurm/tx2/launch.sh. PLAN, DATA.h5 and OUT_DIR must be valid on every board (a shared folder);
# only the stage-0 boards read DATA.h5 and only rank 0 writes OUT_DIR.
# Exit codes: 2 usage / bad input, 3 environment, 4 a rank failed (named), otherwise mpirun's.
set -euo pipefail
HPCSRL_HOME=${HPCSRL_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# shellcheck source-path=SCRIPTDIR source=../env.sh  # the checkout's slurm/env.sh
source "$HPCSRL_HOME/slurm/env.sh"
hpcsrl_need_args 3 $# "${BASH_SOURCE[0]}"
[[ -f $1 ]] || hpcsrl_die 2 "PLAN.json '$1' does not exist"
[[ -f $2 ]] || hpcsrl_die 2 "DATA.h5 '$2' does not exist"
plan=$1
data=$2
out=$3
shift 3
mkdir -p "$out" || hpcsrl_die 2 "cannot create OUT_DIR '$out'"
hpcsrl_require hpcsrl
exec "$HPCSRL_HOME/slurm/tx2/launch.sh" hpcsrl dhp --plan "$plan" --data "$data" --out "$out" "$@"
